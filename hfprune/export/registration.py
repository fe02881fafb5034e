"""Make hfprune's heterogeneous checkpoints load with plain `from_pretrained` once hfprune is imported.

The classes are the ones shipped inside each heterogeneous checkpoint
(`remote_code/configuration_hfprune.py`, `remote_code/modeling_hfprune.py`). Registered with
the Auto classes, `AutoModelForCausalLM.from_pretrained(path)` needs no `trust_remote_code`:
transformers prefers a registered class when remote code is not trusted.

`import hfprune` stays fast with `register_auto_classes(defer=True)`: the registration then
happens once transformers' Auto modules are imported (the moment a user can reach
`AutoConfig` / `AutoModelForCausalLM`), not at `import hfprune`.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import logging
import sys
from typing import Callable

logger = logging.getLogger(__name__)

CONFIG_AUTO = "transformers.models.auto.configuration_auto"

_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..structure import get_architecture, register_architecture, supported_model_types
    from .remote_code.configuration_hfprune import PRUNED_CONFIG_CLASSES
    from .remote_code.modeling_hfprune import PRUNED_MODEL_CLASSES

    for family, config_class in PRUNED_CONFIG_CLASSES.items():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, PRUNED_MODEL_CLASSES[family], exist_ok=True)
        # hfprune_<family> models have their family's prunable structure: they can be pruned again.
        if config_class.model_type not in supported_model_types():
            register_architecture(dataclasses.replace(get_architecture(family), model_types=(config_class.model_type,)))
    _registered = True


def register_auto_classes(defer: bool = False) -> None:
    """Register every `hfprune_<family>` config and causal LM with AutoConfig / AutoModelForCausalLM,
    and with hfprune's architecture registry (so a loaded pruned model can be pruned again).

    defer=True does not import transformers: the registration runs as soon as transformers'
    AutoConfig module has been imported and no transformers module is half-way through its
    own import (registering then would re-enter a partially initialised module). Idempotent.
    """
    if _registered:
        return
    if not defer or (CONFIG_AUTO in sys.modules and not _transformers_initializing()):
        _register()
    else:
        _AfterTransformersImport.install()


def _transformers_initializing(current: str = "") -> bool:
    """Is some transformers module (other than `current`) being imported right now?"""
    for name, module in list(sys.modules.items()):
        if name != current and (name == "transformers" or name.startswith("transformers.")):
            spec = getattr(module, "__spec__", None)
            if getattr(spec, "_initializing", False):
                return True
    return False


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Watches transformers' imports; after the first one that leaves AutoConfig importable and no
    transformers module half-initialised, registers hfprune's classes and removes itself."""

    _instance: "_AfterTransformersImport | None" = None

    @classmethod
    def install(cls) -> None:
        if cls._instance is None:
            cls._instance = cls()
            sys.meta_path.insert(0, cls._instance)

    @classmethod
    def uninstall(cls) -> None:
        if cls._instance is not None and cls._instance in sys.meta_path:
            sys.meta_path.remove(cls._instance)
        cls._instance = None

    def __init__(self) -> None:
        self.registering = False

    def find_spec(self, fullname, path, target=None):
        if self.registering or not (fullname == "transformers" or fullname.startswith("transformers.")):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _CallbackLoader(spec.loader, lambda: self.after_import(fullname))
        return spec

    def after_import(self, fullname: str) -> None:
        if self.registering or CONFIG_AUTO not in sys.modules or _transformers_initializing(fullname):
            return
        self.registering = True
        try:
            _register()
        except Exception as error:  # never break the user's import; they can still trust_remote_code
            logger.warning("hfprune could not register its pruned-model classes with transformers: %r", error)
        finally:
            type(self).uninstall()


class _CallbackLoader(importlib.abc.Loader):
    """The real loader, with a callback once the module has executed."""

    def __init__(self, loader, callback: Callable[[], None]):
        self.loader = loader
        self.callback = callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.callback()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self.loader, name)
