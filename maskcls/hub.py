"""Pretrained weights without surprises offline: whether a torch hub or Hugging Face file is cached or its
host reachable, answered within seconds (`PretrainedUnavailable` otherwise)."""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

import torch
# Imported where used, being heavy or optional: huggingface_hub and timm (only for timm: models).

PROBE_TIMEOUT_S = 3.0


class PretrainedUnavailable(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable (offline)."""


def network_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to ``host`` within ``timeout`` seconds (DNS included)?

    Runs in a daemon thread because name resolution ignores socket timeouts and may hang.
    Behind an HTTPS proxy the proxy is probed instead.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or 80
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def hub_checkpoint_path(url: str) -> str:
    """Where torch.hub.load_state_dict_from_url caches ``url`` (honours $TORCH_HOME at call time)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def require_hub_file(model_name: str, url: str) -> None:
    """Return if ``url``'s checkpoint is cached or its host is reachable; else raise PretrainedUnavailable."""
    path = hub_checkpoint_path(url)
    if os.path.isfile(path):
        return
    host = urlparse(url).hostname or ""
    if network_reachable(host):
        return
    raise PretrainedUnavailable(
        f"Pretrained weights for model {model_name!r} are unavailable: {os.path.basename(path)} is not in "
        f"the torch hub cache ({os.path.dirname(path)}) and {host} cannot be reached. Either train "
        f"without them (--pretrained False) or download {url} on a connected machine and place the file "
        f"in $TORCH_HOME/hub/checkpoints/ (here: {os.path.dirname(path)}).")


def hf_cached(repo_id: str, filenames: list[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo, _, revision = repo_id.partition("@")
    return any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str)
               for f in filenames)


def require_timm_weights(model_name: str, timm_name: str) -> None:
    """Mirror timm's weight source choice (HF hub first, else URL) and check it is cached or reachable."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    if cfg is None or cfg.file or cfg.state_dict is not None:
        return  # no hub involved (or no weights at all: timm raises its own clear error)
    if cfg.hf_hub_id:
        files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        if hf_cached(cfg.hf_hub_id, files):
            return
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        if not offline and network_reachable("huggingface.co"):
            return
        raise PretrainedUnavailable(
            f"Pretrained weights for model {model_name!r} are unavailable: {files[0]} of Hugging Face repo "
            f"{cfg.hf_hub_id} is not in the local Hugging Face cache and huggingface.co cannot be reached. "
            f"Either train without them (--pretrained False) or fetch them on a connected machine "
            f"(`hf download {cfg.hf_hub_id}`) and copy the cache ($HF_HOME/hub) here.")
    if cfg.url:
        require_hub_file(model_name, cfg.url)
