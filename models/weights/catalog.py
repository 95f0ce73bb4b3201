"""Which models a request may name: those given at startup and the folders of operator-set
model directories. Nothing else is ever opened, whatever a request says."""

from __future__ import annotations

import os
import re
from pathlib import Path

from models.errors import ModelLoadError, ModelNotFoundError

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_startup_model(ref: str) -> tuple[str, Path]:
    """(name, folder) for an operator-given local folder or Hugging Face id."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve().name, path.resolve()
    if _HUB_ID.match(ref):
        try:
            from huggingface_hub import snapshot_download

            folder = snapshot_download(ref, allow_patterns=["*.json", "model*.safetensors", "*.model",
                                                            "*.tiktoken", "*.txt", "*.jinja"])
        except Exception as e:  # offline, unknown repo, gated...
            raise ModelLoadError(f"model {ref!r} is not a local folder and could not be fetched from "
                                 f"the Hugging Face hub ({type(e).__name__})") from None
        return ref, Path(folder)
    raise ModelLoadError(f"model {ref!r} is neither a folder nor a Hugging Face id")


class ModelCatalog:
    def __init__(self, models: dict[str, Path], model_dirs: tuple[Path, ...] = (),
                 aliases: dict[str, str] | None = None) -> None:
        self._models = dict(models)
        self._dirs = tuple(Path(d).resolve() for d in model_dirs)
        # other ids of a startup model: the exact `--model` string, which vLLM's and mlx_lm.server's
        # clients send back as the model id
        self._aliases = {alias: name for alias, name in (aliases or {}).items() if name in self._models}

    def canonical(self, name: str) -> str:
        """The name a model is known by (its variants, responses, /models) for any id it may be sent as."""
        return self._aliases.get(name, name)

    def resolve(self, name: str) -> Path:
        """The folder of an allowed model; path-like or unknown names never touch the disk."""
        name = self.canonical(name)
        if name in self._models:
            return self._models[name]
        if _PLAIN_NAME.match(name) and ".." not in name:
            for root in self._dirs:
                if self._servable(root / name):
                    return root / name
        raise ModelNotFoundError(f"model {name!r} is not available; available: {', '.join(self.names())}")

    def names(self) -> list[str]:
        found = list(self._models)
        for root in self._dirs:
            if root.is_dir():
                found += sorted(p.name for p in root.iterdir()
                                if _PLAIN_NAME.match(p.name) and self._servable(p) and (p / "config.json").exists()
                                and p.name not in found)
        return found

    def _servable(self, candidate: Path) -> bool:
        """A folder whose real location, symbolic links followed, lies inside an allowed folder."""
        try:
            if not candidate.is_dir():
                return False
            target = candidate.resolve(strict=True)
        except (OSError, RuntimeError):  # a link loop, a folder removed meanwhile
            return False
        return any(target != root and target.is_relative_to(root) for root in self._dirs)

    def startup_names(self) -> list[str]:
        return list(self._models)


def default_model_ref() -> str:
    """The bundled model folder."""
    return os.fspath(Path(__file__).resolve().parent.parent / "bundled" / "tiny-arith")
