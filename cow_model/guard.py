"""``WriteGuard``: refuse writes to storages a clone shares with its base, before they happen.

A ``TorchDispatchMode`` that looks at every aten operator while it is active. An operator
whose schema marks an argument as written (in-place ops, ``out=`` variants, ``copy_``,
``set_``, writes through ``.data`` or through views) raises :class:`SharedWeightsError` when
that argument's storage is protected, before the kernel runs. Operators that only rebind a
tensor object (``set_``, ``detach_``, ``as_strided_``, in-place reshapes) are refused only on
protected tensor *objects*: on an alias (a private tensor object viewing shared bytes) they
change the alias alone, which is how parametrizations end up with private tensors.

What it cannot see: writes that do not go through aten operators (``tensor.numpy()`` views of
CPU tensors, C extensions writing raw pointers, ``tensor.data_ptr()`` handed to other libraries),
and storage-level calls such as ``share_memory_()``.

A scope also passes ``before_write(tensor, storage)``, called before every other write, so it
can snapshot the clone's own bytes it is about to change (a rollback puts them back).

The protected sets are computed lazily, on the first writing operator, so a guarded function
that writes nothing pays only for entering and leaving the mode. Dispatch modes are per thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import SharedWeightsError
from .tree import storage_id

aten = torch.ops.aten
_REBINDING = frozenset(
    {
        aten.set_,
        aten.detach_,
        aten.as_strided_,
        aten.squeeze_,
        aten.unsqueeze_,
        aten.t_,
        aten.transpose_,
        aten.swapdims_,
        aten.swapaxes_,
    }
)
_written: dict[Any, tuple[tuple[int, str], ...]] = {}


def _written_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """``(position, name)`` of the arguments ``func``'s schema marks as written (cached per overload)."""
    found = _written.get(func)
    if found is None:
        found = tuple(
            (i, arg.name)
            for i, arg in enumerate(func._schema.arguments)
            if arg.alias_info is not None and arg.alias_info.is_write
        )
        _written[func] = found
    return found


Protected = tuple[set[tuple[str, int]], set[int]]
"""Protected storages (``storage_id``) and protected tensor objects (``id``)."""


class WriteGuard(TorchDispatchMode):
    """Raise ``SharedWeightsError`` before an operator writes protected bytes or rebinds a protected tensor.

    ``protected()`` is called once, at the first writing operator, and returns the protected
    storages and tensor ids; ``describe(tensor)`` names a tensor for the message; ``what``
    names the operation the guard runs for ("patch function for 'down.0'", "clone.apply()");
    ``before_write(tensor, storage_id)``, when given, is called before each write that is let through.
    """

    def __init__(
        self,
        protected: Callable[[], Protected],
        describe: Callable[[torch.Tensor], str],
        what: str,
        before_write: Callable[[torch.Tensor, tuple[str, int] | None], None] | None = None,
    ) -> None:
        super().__init__()
        self._protected_fn = protected
        self._protected: Protected | None = None
        self._describe = describe
        self._before_write = before_write
        self.what = what

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for position, name in _written_arguments(func):
            target = args[position] if position < len(args) else kwargs.get(name)
            for tensor in target if isinstance(target, (list, tuple)) else (target,):
                if isinstance(tensor, torch.Tensor):
                    self._check(func, tensor)
        return func(*args, **kwargs)

    def _check(self, func: Any, tensor: torch.Tensor) -> None:
        if self._protected is None:
            self._protected = self._protected_fn()
        storages, objects = self._protected
        key = storage_id(tensor)
        if func.overloadpacket in _REBINDING:
            if id(tensor) in objects:
                self._refuse(func, tensor, "rebind")
        elif key in storages:
            self._refuse(func, tensor, "write to")
        if self._before_write is not None:
            self._before_write(tensor, key)

    def _refuse(self, func: Any, tensor: torch.Tensor, action: str) -> None:
        raise SharedWeightsError(
            f"{self.what} would {action} {self._describe(tensor)}, a tensor shared with the base model "
            f"({func}); refused before anything was written. Give the clone its own tensor instead "
            "(assign a new nn.Parameter or buffer, or use load_state_dict), or change the base itself."
        )
