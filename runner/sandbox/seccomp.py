"""The seccomp filter every job gets: a classic BPF program for bwrap --seccomp, compiled
from a table of syscalls (`_SECCOMP_RULES`). A denylist: sockets other than AF_UNIX,
io_uring, new user namespaces and the kernel keyring are refused, everything else is
allowed (an allowlist profile is not attempted)."""

from __future__ import annotations

import platform
import struct

# The seccomp filter as a table: syscall -> what happens to it; anything not named is
# allowed. An action is "allow" or an errno; a tuple tests the call's first argument (low 32
# bits): (test, operand, action when it holds, action when not), test "==" or "&" (any bit).
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
AF_UNIX, CLONE_NEWUSER = 1, 0x10000000
_SECCOMP_RULES: dict[str, str | int | tuple] = {
    "socket": ("==", AF_UNIX, "allow", EAFNOSUPPORT),  # no network; multiprocessing needs AF_UNIX
    "io_uring_setup": EPERM,  # io_uring can open sockets past this filter
    "unshare": EPERM,  # no new namespaces: a user namespace would regain capabilities
    "clone": ("&", CLONE_NEWUSER, EPERM, "allow"),
    "clone3": ENOSYS,  # its flags are in memory BPF cannot read; libc falls back to clone
    "keyctl": EPERM,  # the kernel keyring is not namespaced: no host session keys
    "add_key": EPERM,
    "request_key": EPERM,
}
# Per architecture: the AUDIT_ARCH value and the syscall numbers of the table's names.
_SYSCALLS = {
    "x86_64": (0xC000003E, {"socket": 41, "clone": 56, "unshare": 272, "add_key": 248,
                            "request_key": 249, "keyctl": 250, "io_uring_setup": 425,
                            "clone3": 435}),
    "aarch64": (0xC00000B7, {"socket": 198, "clone": 220, "unshare": 97, "add_key": 217,
                             "request_key": 218, "keyctl": 219, "io_uring_setup": 425,
                             "clone3": 435}),
}


def _seccomp_program(arch: str | None = None) -> bytes | None:
    """Classic BPF for bwrap --seccomp, compiled from `_SECCOMP_RULES`: each rule is one
    block `if nr == N: <block>` whose jump over it is the block's length, so no offset is
    counted by hand. None on an architecture without numbers here."""
    arch = arch or platform.machine()
    if arch not in _SYSCALLS:
        return None
    audit, numbers = _SYSCALLS[arch]
    LD_ABS, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
    ALLOW, KILL, ERRNO = 0x7FFF0000, 0x80000000, 0x00050000
    NR, ARCH, ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg0: low 32 bits)

    def ret(action) -> tuple:
        return (RET, 0, 0, ALLOW if action == "allow" else ERRNO | action)

    prog = [
        (LD_ABS, 0, 0, ARCH),
        (JEQ, 1, 0, audit),
        (RET, 0, 0, KILL),  # a foreign syscall ABI (e.g. int 0x80)
        (LD_ABS, 0, 0, NR),
    ]
    if arch == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | ENOSYS)]  # the x32 ABI
    for name, rule in _SECCOMP_RULES.items():
        if isinstance(rule, tuple):
            test, operand, yes, no = rule
            block = [(LD_ABS, 0, 0, ARG0), (JEQ if test == "==" else JSET, 0, 1, operand),
                     ret(yes), ret(no)]  # both paths return: A (now arg0) is not reused
        else:
            block = [ret(rule)]
        prog += [(JEQ, 0, len(block), numbers[name]), *block]
    prog.append((RET, 0, 0, ALLOW))
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


def _describe_rule(rule) -> str:
    def action(a) -> str:
        return "allow" if a == "allow" else f"errno {a}"
    if isinstance(rule, tuple):
        test, operand, yes, no = rule
        return f"arg0 {test} {operand:#x}: {action(yes)}, else {action(no)}"
    return action(rule)
