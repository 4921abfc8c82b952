"""Cache the frozen leading part of a network, so training the last blocks on CPU is cheap.

When ``--train-blocks`` trains only the last units, everything before the first
trained unit (the *prefix*) is frozen and runs in eval mode, so for an image that is
not augmented its output is the same every epoch. :class:`FrozenPrefix` computes it
once per image (during the head stage's feature pass when there is one) and later
runs the network from the cached activation: the prefix modules are swapped, for the
duration of one call, for a module returning the cached batch and identities (what
that saves: docs/finetune.md, "Cached frozen prefix").

This relies on the prefix being applied as a plain sequence of the network's
top-level modules (with ``Sequential`` children expanded), which holds for timm's
EfficientNets, ResNets and most CNNs; :meth:`FrozenPrefix.verify` checks it on a real
batch before the cache is used, and the run falls back to full forward passes when
it does not hold.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)

_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList)


def leaf_sequence(net: torch.nn.Module) -> list[str]:
    """Top-level module names in registration order, containers expanded one level."""
    out = []
    for name, child in net.named_children():
        if isinstance(child, _CONTAINERS) and len(child) > 0:
            out.extend(f"{name}.{n}" for n, _ in child.named_children())
        else:
            out.append(name)
    return out


class _Inject(torch.nn.Module):
    """Ignores its input and returns the tensor it was given."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.value


class FrozenPrefix:
    """The modules before *first_trainable*, their cached outputs, and injection."""

    def __init__(self, net: torch.nn.Module, first_trainable: str, max_bytes: float = 4 * 1024 ** 3):
        leaves = leaf_sequence(net)
        if first_trainable not in leaves:
            raise ValueError(f"{first_trainable} is not a top-level unit")
        self.net = net
        self.names = leaves[: leaves.index(first_trainable)]
        if not self.names:
            raise ValueError("nothing before the first trained unit")
        self.modules = [net.get_submodule(n) for n in self.names]
        self.last = self.names[-1]
        self.cache: dict[Hashable, torch.Tensor] = {}
        self.max_bytes = max_bytes
        self.bytes = 0
        self.full = False

    # ------------------------------------------------------------------ compute

    def run(self, x: torch.Tensor) -> torch.Tensor:
        """The prefix output of a normalised batch (eval mode, no gradient)."""
        modes = [m.training for m in self.modules]
        try:
            for m in self.modules:
                m.eval()
            with torch.no_grad():
                for m in self.modules:
                    x = m(x)
        finally:
            for m, t in zip(self.modules, modes):
                m.train(t)
        return x

    @contextlib.contextmanager
    def injected(self, z: torch.Tensor) -> Iterator[torch.Tensor]:
        """Within the block, ``net(dummy)`` runs from the prefix output *z*; yields a dummy
        input of the right batch size to call the network with."""
        net = self.net
        net.set_submodule(self.names[0], _Inject(z))
        for n in self.names[1:]:
            net.set_submodule(n, torch.nn.Identity())
        try:
            yield z.new_zeros((z.shape[0], 1, 1, 1))
        finally:
            for n, m in zip(self.names, self.modules):
                net.set_submodule(n, m)

    def verify(self, x: torch.Tensor, rtol: float = 1e-4, atol: float = 1e-4) -> bool:
        """Whether running from the prefix output gives the network's own output on *x*."""
        was = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                ref = self.net(x)
                z = self.run(x)
                with self.injected(z) as dummy:
                    got = self.net(dummy)
        except Exception as e:  # the net does something with its input besides the prefix
            log.info("prefix cache not usable: %s: %s", type(e).__name__, e)
            return False
        finally:
            self.net.train(was)
        return isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.shape == got.shape and \
            torch.allclose(ref.float(), got.float(), rtol=rtol, atol=atol)

    # ------------------------------------------------------------------ cache

    def put(self, key: Hashable, z: torch.Tensor) -> None:
        if key in self.cache or self.full:
            return
        size = z.numel() * z.element_size()
        if self.bytes + size > self.max_bytes:
            self.full = True
            log.warning("prefix cache reached %.1f GiB; further images run the whole network",
                        self.max_bytes / 1024 ** 3)
            return
        with torch.inference_mode(False):  # a normal tensor, usable later in training passes
            self.cache[key] = z.detach().clone()
        self.bytes += size

    def batch(self, keys: Sequence[Hashable | None], normalized: callable, device: torch.device) -> torch.Tensor:
        """Prefix outputs of a batch: cached rows from the cache, the others computed
        from ``normalized(rows)`` (the normalised input of those rows) and cached when
        their key is not None."""
        todo = [i for i, k in enumerate(keys) if k is None or k not in self.cache]
        computed = {}
        if todo:
            z = self.run(normalized(todo))
            for j, i in enumerate(todo):
                computed[i] = z[j]
                if keys[i] is not None:
                    self.put(keys[i], z[j])
        rows = [computed[i] if i in computed else self.cache[keys[i]] for i in range(len(keys))]
        return torch.stack(rows).to(device)
