"""Which classes a config may name: an allow-list of packages for ``class_path`` values.

A stage config (YAML or command line) can name classes to build: ``trainer.strategy``,
``trainer.callbacks``, ``optimizer``, FSDP wrap units... Instantiating a class is running its
code, so a config from elsewhere could run anything importable (``class_path: os.system`` is
already refused by jsonargparse's own deny-list; a class of some other installed package is
not). Every :class:`onemall_pl.stage.StageCLI` therefore parses and instantiates under
jsonargparse's import-path policy (``set_parsing_settings(import_path_denylist=["*"],
import_path_allowlist=...)``, checked *before* the module is imported):

- allowed: the packages in :data:`ALLOWED_PACKAGES` (this project, Lightning, torch,
  torchmetrics, transformers, timm), except the loaders and code-generating parts of torch in
  :data:`DENIED_UNDER_ALLOWED`;
- anything else fails the parse with ``Importing '<path>' is not allowed`` and the key it was
  given for, before any class is built.

To run a config that names your own classes, pass ``--allow_any_class`` anywhere on the stage's
command line, or set ``ONEMALL_ALLOW_ANY_CLASS=1``; jsonargparse's default policy then applies
(it warns on, but from jsonargparse 5 refuses, ``os``, ``subprocess``, ``pickle``...).
Under DDP the flag reaches the re-launched ranks with the command line (or through the variable).

Types named by the code (annotations, defaults) are never checked, so jsonargparse's own types
need no entry (and jsonargparse refuses to allow-list itself).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator, Sequence

ALLOW_ANY_FLAG = "--allow_any_class"
ALLOW_ANY_ENV = "ONEMALL_ALLOW_ANY_CLASS"
ALLOWED_PACKAGES: tuple[str, ...] = (
    "onemall_pl", "lightning", "pytorch_lightning", "lightning_fabric", "torch", "torchmetrics",
    "transformers", "timm")
# under an allowed package: what loads pickles / code or writes files by a name the config decides
DENIED_UNDER_ALLOWED: tuple[str, ...] = (
    "torch.load", "torch.save", "torch.serialization", "torch.hub", "torch.package", "torch.jit.load",
    "torch.utils.cpp_extension", "torch.utils.data.datapipes", "torch.distributed.rpc", "torch.multiprocessing",
    "torch._dynamo", "torch._inductor")


def allow_any_requested(argv: Sequence[str] | None = None) -> bool:
    """True if ``argv`` holds :data:`ALLOW_ANY_FLAG` or the environment sets :data:`ALLOW_ANY_ENV`."""
    env = os.environ.get(ALLOW_ANY_ENV, "").strip().lower()
    if env not in ("", "0", "1", "true", "false", "yes", "no"):
        raise ValueError(f"{ALLOW_ANY_ENV}={env!r}: expected 1 / 0 (or true / false)")
    return env in ("1", "true", "yes") or (argv is not None and ALLOW_ANY_FLAG in argv)


def take_allow_any_flag(args):
    """Strip :data:`ALLOW_ANY_FLAG` from a stage's arguments; returns ``(args, allow_any)``.

    ``args=None`` means ``sys.argv``: the flag is removed there in place and recorded in the
    environment, so that the DDP ranks Lightning re-launches from ``sys.argv`` inherit it.
    A list is copied (the caller's ``sys.argv`` still holds the flag for re-launched ranks).
    Dict / Namespace arguments carry no flag (use the environment variable).
    """
    if args is None:
        allow = allow_any_requested(sys.argv[1:])
        if ALLOW_ANY_FLAG in sys.argv:
            sys.argv[:] = [a for a in sys.argv if a != ALLOW_ANY_FLAG]
            os.environ[ALLOW_ANY_ENV] = "1"
        return None, allow
    if isinstance(args, (list, tuple)):
        return [a for a in args if a != ALLOW_ANY_FLAG], allow_any_requested(args)
    return args, allow_any_requested()


@contextlib.contextmanager
def class_path_policy(allow_any: bool = False) -> Iterator[None]:
    """Within the block, values that name a class / callable must lie under :data:`ALLOWED_PACKAGES`
    (unless ``allow_any``). jsonargparse's policy is process-global, so the one in force before
    is restored on exit (several CLIs may run in one process, e.g. in tests)."""
    from jsonargparse import set_parsing_settings
    from jsonargparse._common import parsing_settings  # the policy has no public getter to restore from

    saved = {k: parsing_settings[k] for k in ("import_path_verdicts", "import_paths_enforced")}
    try:
        if not allow_any:
            set_parsing_settings(import_path_denylist=["*", *DENIED_UNDER_ALLOWED],
                                 import_path_allowlist=list(ALLOWED_PACKAGES))
        yield
    finally:
        parsing_settings.update(saved)


class _Tee(io.TextIOBase):
    def __init__(self, stream):
        self.stream, self.seen = stream, io.StringIO()

    def write(self, s: str) -> int:
        self.seen.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def hint_if_denied() -> Iterator[None]:
    """Around a parse: when it exits on a class path the policy refused, say how to allow it
    (jsonargparse's own message points at its Python API, not at the command line)."""
    tee = _Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(tee):
            yield
    except SystemExit as e:
        if e.code not in (0, None) and "is not allowed, denied by" in tee.seen.getvalue():
            print(f"onemall: configs may only name classes under {', '.join(ALLOWED_PACKAGES)} (less "
                  f"{', '.join(DENIED_UNDER_ALLOWED)}); to build a class from elsewhere, pass {ALLOW_ANY_FLAG} "
                  f"or set {ALLOW_ANY_ENV}=1 (only for configs you trust)", file=sys.stderr)
        raise
