"""Two LoRA adapters on one frozen base: ``live`` (served) and ``candidate`` (learning).

Publishing copies ``candidate`` into ``live`` in place (a few MB); a request never sees a
half-trained or unchecked adapter. Adapters are PEFT's own, so they save in PEFT's format.
"""
from __future__ import annotations

import warnings

import torch

from ..config import ConfigError, LoraConfig
from ..durable import fsync, temporary

TRAIN, LIVE = "candidate", "live"  # "train" would clash with nn.Module.train


def attach_lora(model, cfg: LoraConfig, structure_only: bool = False):
    """Wrap ``model`` with the two adapters. Returns the PeftModel.

    ``structure_only``: ``model`` is on the meta device (a trainer process's copy of the
    structure, whose tensors :func:`bind_tensors` then takes from the serving process): the
    adapters' modules are made, but no values are copied between them."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    targets = cfg.module_names()
    leaf_names = {name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                  if isinstance(mod, torch.nn.Linear)}
    missing = [t for t in targets if t not in leaf_names]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} not found in this model; "
                          f"its linear modules are: {', '.join(sorted(leaf_names))}")
    pcfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                          bias="lora_only" if cfg.enable_bias else "none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT reads an attribute transformers deprecates: not the user's concern
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, pcfg, adapter_name=TRAIN)
        peft_model.add_adapter(LIVE, pcfg)
    for name, p in peft_model.named_parameters():
        p.requires_grad_(f".{TRAIN}." in name or name.endswith(f".{TRAIN}"))
    if not structure_only:
        copy_adapter(peft_model, TRAIN, LIVE)
    activate(peft_model, LIVE)
    return peft_model


def shared_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` a copy of its structure needs, by name: parameters (a tied one
    under each of its names), buffers, and tensors modules keep as plain attributes (rotary
    embeddings' tables). What :func:`bind_tensors` takes."""
    out = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)}
    out.update(dict(model.named_buffers(remove_duplicate=False)))
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for k, v in vars(mod).items():
            if torch.is_tensor(v) and not k.startswith("_"):
                out.setdefault(f"{prefix}.{k}" if prefix else k, v)
    return out


def bind_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    """Point each of ``model``'s parameters, buffers and tensor attributes named in ``tensors`` at
    that tensor (a parameter stays a parameter, with its ``requires_grad``). ``model``'s own
    tensors are dropped: built on the meta device, it then computes with, and trains, the
    tensors of the model they came from. Raises ValueError naming a tensor ``model`` lacks, or
    one of its own left unbound."""
    made = {}  # a tied weight (one tensor under two names) stays one parameter: it trains once
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        try:
            mod = model.get_submodule(prefix) if prefix else model
        except AttributeError:
            raise ValueError(f"the model has no module {prefix!r} (tensor {name!r})") from None
        if mod._parameters.get(leaf) is not None:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key not in made:
                made[key] = torch.nn.Parameter(t, requires_grad=mod._parameters[leaf].requires_grad)
            mod._parameters[leaf] = made[key]
        elif leaf in mod._buffers:
            mod._buffers[leaf] = t
        elif torch.is_tensor(getattr(mod, leaf, None)):
            setattr(mod, leaf, t)
        else:
            raise ValueError(f"the model has no tensor {name!r}")
    model.__dict__.pop("_idletune_cache", None)  # the adapters' lists, made before binding
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{len(left)} tensors not bound, e.g. {left[0]!r}")


def _lora_layer_types():
    from peft.tuners.lora import LoraLayer

    return [LoraLayer]


def _lora_layers(model):
    types = tuple(_lora_layer_types())
    return [m for m in model.modules() if isinstance(m, types)]


def activate(model, name: str) -> None:
    """Make adapter ``name`` the one every LoRA layer applies.

    Only the ``candidate`` adapter ever requires grad. PEFT's own switches (``set_adapter``,
    leaving ``disable_adapter()``) hand requires_grad to whichever adapter is active, so the
    flags are re-asserted here, on cached lists (cheap)."""
    layers, train_params, live_params = _cache(model)
    for m in layers:
        m._active_adapter = [name]
    if not train_params[0].requires_grad or live_params[0].requires_grad:
        for p in train_params:
            p.requires_grad_(True)
        for p in live_params:
            p.requires_grad_(False)


def _cache(model) -> tuple[list, list, list]:
    """The LoRA layers and both adapters' tensors (matching order), listed once per model: a
    name scan of the whole model costs milliseconds, and the engine needs the list every step."""
    cache = getattr(model, "_idletune_cache", None)
    if cache is None:
        cache = (_lora_layers(model), list(adapter_tensors(model, TRAIN).values()),
                 list(adapter_tensors(model, LIVE).values()))
        model._idletune_cache = cache
    return cache


def trainable_tensors(model) -> list[torch.nn.Parameter]:
    """The ``candidate`` adapter's tensors, from the cached list (see :func:`_cache`)."""
    return list(_cache(model)[1])


def adapter_tensors(model, name: str) -> dict[str, torch.Tensor]:
    """The adapter's parameters by name (adapter name removed, so two adapters' keys match)."""
    tag = f".{name}."
    return {k.replace(tag, "."): p for k, p in model.named_parameters()
            if tag in k and ("lora_" in k)}


@torch.no_grad()
def copy_adapter(model, src: str, dst: str) -> None:
    if {src, dst} == {TRAIN, LIVE}:
        _, train, live = _cache(model)  # the two adapters' lists, in matching order
        lists = {TRAIN: train, LIVE: live}
        torch._foreach_copy_(lists[dst], lists[src])  # one launch, no name scan (publish latency)
        return
    a, b = adapter_tensors(model, src), adapter_tensors(model, dst)
    for k, t in a.items():
        b[k].copy_(t)


@torch.no_grad()
def clone_adapter(model, name: str) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in adapter_tensors(model, name).items()}


@torch.no_grad()
def load_adapter_tensors(model, name: str, tensors: dict[str, torch.Tensor]) -> None:
    dst = adapter_tensors(model, name)
    if set(dst) != set(tensors):
        missing, extra = set(dst) - set(tensors), set(tensors) - set(dst)
        raise ValueError(f"adapter tensors do not match the model: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]}")
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"adapter tensor {k} has non-finite values")
        dst[k].copy_(t)


def text_config(model):
    """The language model's config (of the base model under a PeftModel; the text part of a
    multimodal config)."""
    cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_layers(model) -> list[torch.nn.Module]:
    """The transformer blocks (the largest ModuleList), where training can be preempted."""
    best: list = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > len(best):
            best = list(mod)
    return best


def save_adapter(model, name: str, path, base_model_path: str | None = None) -> str:
    """Write adapter ``name`` in PEFT's format (adapter_config.json + adapter_model.safetensors)
    so ``peft.PeftModel.from_pretrained(base, path)`` loads it. Returns the weights' sha256."""
    return write_adapter(clone_adapter(model, name), model.peft_config[name], path, base_model_path)


def write_adapter(tensors: dict[str, torch.Tensor], peft_config, path, base_model_path: str | None = None) -> str:
    """Write adapter tensors (keyed like PEFT's saved state dict) and config; files fsynced,
    weights renamed into place. Returns the sha256 of adapter_model.safetensors."""
    import copy
    import hashlib
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                      path / "adapter_model.safetensors")
    cfg = copy.deepcopy(peft_config)
    if base_model_path:
        cfg.base_model_name_or_path = str(base_model_path)
    cfg.inference_mode = True
    cfg.save_pretrained(str(path))
    fsync(path / "adapter_config.json")
    return hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()


def read_adapter(model, name: str, path) -> dict[str, torch.Tensor]:
    """Read a PEFT-format adapter folder into tensors keyed like :func:`adapter_tensors`."""
    from pathlib import Path

    from safetensors.torch import load_file

    sd = load_file(str(Path(path) / "adapter_model.safetensors"))
    own = adapter_tensors(model, name)
    out = {}
    for k, v in sd.items():
        # PEFT drops the adapter name: "...q_proj.lora_A.weight" -> ours "...q_proj.lora_A.weight"
        key = k if k in own else None
        if key is None:
            matches = [o for o in own if o.endswith(k.split("base_model.model.", 1)[-1])]
            key = matches[0] if len(matches) == 1 else None
        if key is None:
            raise ValueError(f"{path}: tensor {k} does not belong to this model's adapter")
        out[key] = v
    return out


def write_safetensors(sd: dict[str, torch.Tensor], path) -> None:
    """Write ``sd`` to ``path``: a temporary file, fsynced, renamed into place. The file gets
    the mode any other file gets (0666 less the umask), not the 0600 of the temporary file
    safetensors writes through."""
    import os
    import stat

    from safetensors.torch import save_file

    tmp = temporary(path)
    if os.path.lexists(tmp):
        os.unlink(tmp)  # left by a crash: its mode is not the one a new file gets
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # as open(..., "w"): the umask applies
    mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.close(fd)
    save_file(sd, tmp, metadata={"format": "pt"})
    os.chmod(tmp, mode)
    fsync(tmp)
    os.replace(tmp, path)
