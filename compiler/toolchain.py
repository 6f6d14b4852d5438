"""The host's toolchains: the cross compiler that links a module for its target's CPU."""

from __future__ import annotations

from targets import TargetDescription

from .errors import TargetError


def export_compiler(target: TargetDescription):
    """The ``fcompile`` used to link an exported library for ``target`` (None: the host compiler)."""
    if target.cross_compiler:
        from tvm.support import cc

        check_cross_compiler(target)
        return cc.cross_compiler(target.cross_compiler, options=[])  # a fresh list: cc appends to it
    return None


def check_cross_compiler(target: TargetDescription) -> None:
    """A clear TargetError naming the package to install when ``target``'s cross compiler is missing."""
    import shutil

    if not target.cross_compiler or shutil.which(target.cross_compiler):
        return
    prefix, sep, tool = target.cross_compiler.rpartition("-")
    package = f"{tool}-{prefix}" if sep and tool in ("g++", "gcc", "c++") else target.cross_compiler
    script = {"arm": "scripts/setup_arm.sh, which installs the ARM cross toolchains and the emulated aarch64 "
                     "device", "mcu": "scripts/setup_mcu.sh"}.get(target.family)
    raise TargetError(
        f"the cross compiler {target.cross_compiler!r} for target {target.name!r} is not installed (not on "
        f"PATH): install it with `apt-get install {package}`" + (f", or run {script}" if script else "")
    )
