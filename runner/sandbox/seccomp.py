"""The seccomp filter every job gets: a classic BPF program for bwrap --seccomp, compiled
from a table of syscalls (`_SECCOMP_RULES`). A denylist: sockets other than AF_UNIX,
AF_INET, AF_INET6 and route netlink, io_uring, new user namespaces and the kernel keyring
are refused, everything else is allowed (an allowlist profile is not attempted).

Inet sockets are allowed for one reason: a multi-device job's process group (gloo on CPU,
NCCL's bootstrap on GPUs) talks TCP over loopback, and both list the network interfaces
(getifaddrs, which glibc answers through a NETLINK_ROUTE socket). None of it reaches beyond
the jail because the job always runs in its own network namespace, which holds only `lo`,
without the capabilities to change it: `policy._policy` refuses to build a jail whose filter
allows inet sockets without `--unshare-net` (`inet_allowed`). Every other netlink protocol,
AF_PACKET and every other family still get EAFNOSUPPORT.
"""

from __future__ import annotations

import platform
import struct

# The seccomp filter as a table: syscall -> what happens to it; anything not named is
# allowed. A rule is an action ("allow" or an errno) or a test of one argument (its low 32
# bits): (argument index, test, operand, rule when it holds, rule when not), where test is
# "==" (equal to the operand), "in" (equal to one of the operand's values) or "&" (a bit in
# common with the operand); the two branches are rules again, so tests nest.
EPERM, ENOSYS, EAFNOSUPPORT = 1, 38, 97
AF_UNIX, AF_INET, AF_INET6, AF_NETLINK, NETLINK_ROUTE = 1, 2, 10, 16, 0
CLONE_NEWUSER = 0x10000000
_SECCOMP_RULES: dict[str, str | int | tuple] = {
    # socket(family, type, protocol): AF_UNIX for multiprocessing; AF_INET/AF_INET6 for a
    # process group over loopback and NETLINK_ROUTE for getifaddrs, safe only inside the
    # job's own network namespace (see inet_allowed)
    "socket": (0, "in", (AF_UNIX, AF_INET, AF_INET6), "allow",
               (0, "==", AF_NETLINK, (2, "==", NETLINK_ROUTE, "allow", EAFNOSUPPORT),
                EAFNOSUPPORT)),
    "io_uring_setup": EPERM,  # io_uring can open sockets past this filter
    "unshare": EPERM,  # no new namespaces: a user namespace would regain capabilities
    "clone": (0, "&", CLONE_NEWUSER, EPERM, "allow"),
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
_TESTS = ("==", "in", "&")


TESTS = {"==": lambda value, operand: value == operand,
         "in": lambda value, operand: value in operand,
         "&": lambda value, operand: bool(value & operand)}


def rule_action(name: str, *args: int, rules: dict | None = None) -> str | int:
    """What the table does to syscall `name` called with `args` (missing ones are 0): the
    table's meaning, which the compiled program must agree with."""
    rule = (_SECCOMP_RULES if rules is None else rules).get(name, "allow")
    while isinstance(rule, tuple):
        index, test, operand, yes, no = rule
        value = args[index] if index < len(args) else 0
        holds = TESTS[test](value, operand)
        rule = yes if holds else no
    return rule


def inet_allowed(rules: dict | None = None) -> bool:
    """Whether the table lets a job open AF_INET or AF_INET6 sockets: then the jail must have
    its own network namespace, or the job would reach the host's network."""
    return any(rule_action("socket", family, 1, 0, rules=rules) == "allow"
               for family in (AF_INET, AF_INET6))


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
    NR, ARCH, ARGS = 0, 4, 16  # offsets in struct seccomp_data (args: 8 bytes each, low first)

    def block(rule) -> list[tuple]:
        """A rule as instructions that always end in a return (so A is never reused)."""
        if not isinstance(rule, tuple):
            return [(RET, 0, 0, ALLOW if rule == "allow" else ERRNO | rule)]
        index, test, operand, yes, no = rule
        assert test in _TESTS and 0 <= index < 6, rule
        # One jump per value tested: a hit jumps over the checks left and the "not" branch
        # to the "holds" branch; missing them all falls through to the "not" branch.
        checks = ([(JSET, operand)] if test == "&" else
                  [(JEQ, v) for v in (operand if test == "in" else (operand,))])
        if_not, if_holds = block(no), block(yes)
        jumps = [(op, len(checks) - 1 - i + len(if_not), 0, k)
                 for i, (op, k) in enumerate(checks)]
        assert jumps[0][1] <= 255, "a BPF jump reaches 255 instructions at most"
        return [(LD_ABS, 0, 0, ARGS + 8 * index), *jumps, *if_not, *if_holds]

    prog = [
        (LD_ABS, 0, 0, ARCH),
        (JEQ, 1, 0, audit),
        (RET, 0, 0, KILL),  # a foreign syscall ABI (e.g. int 0x80)
        (LD_ABS, 0, 0, NR),
    ]
    if arch == "x86_64":
        prog += [(JGE, 0, 1, 0x40000000), (RET, 0, 0, ERRNO | ENOSYS)]  # the x32 ABI
    for name, rule in _SECCOMP_RULES.items():
        body = block(rule)
        prog += [(JEQ, 0, len(body), numbers[name]), *body]
    prog.append((RET, 0, 0, ALLOW))
    return b"".join(struct.pack("<HBBI", *ins) for ins in prog)


def _describe_rule(rule) -> str:
    """A rule in words, e.g. "arg0 in {0x1, 0x2, 0xa}: allow, else errno 97"."""
    if not isinstance(rule, tuple):
        return "allow" if rule == "allow" else f"errno {rule}"
    index, test, operand, yes, no = rule
    shown = ("{" + ", ".join(f"{v:#x}" for v in operand) + "}" if test == "in"
             else f"{operand:#x}")
    then, otherwise = (f"({_describe_rule(r)})" if isinstance(r, tuple) else _describe_rule(r)
                       for r in (yes, no))
    return f"arg{index} {test} {shown}: {then}, else {otherwise}"
