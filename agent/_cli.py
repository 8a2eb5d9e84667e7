"""``mproxy-agent``: serve one controller on this process's stdin and stdout."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

import childproc
from link import FdTransport, __version__, enlarge_pipe, fill_standard_fds

from . import _cgroup, _orphans, serve
from ._guardian import Guardian, start_guardian

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mproxy-agent",
        description="Run child processes for a controller that speaks the mproxy protocol "
        "(msgpack frames) on this process's stdin and stdout. Diagnostics go to stderr.",
    )
    parser.add_argument("--version", action="version", version=f"mproxy-agent {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error"),
        help="least severe log records sent to the controller and stderr (default: info)",
    )
    parser.add_argument(
        "--grace", type=_non_negative_float, default=5.0, metavar="SECONDS",
        help="time between SIGTERM and SIGKILL when children must go (default: 5)",
    )
    parser.add_argument(
        "--max-children", type=_positive_int, default=10_000, metavar="N",
        help="children not yet closed by the controller; further execs fail (default: 10000)",
    )
    parser.add_argument(
        "--no-cgroup", dest="cgroup", action="store_false",
        help="do not put the children in a cgroup of the agent's own (cgroup v2, where "
        "it may create one): without it, descendants that leave their process group "
        "survive the agent being killed outright",
    )
    return parser


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {text!r}")
    return value


def _claim_stdio() -> tuple[int, int]:
    """Take private copies of stdin/stdout for the protocol and point fds 0 and 1 away,
    so nothing else (a stray print, a library) can corrupt the frame stream."""
    read_fd = os.dup(0)
    write_fd = os.dup(1)
    enlarge_pipe(read_fd)
    enlarge_pipe(write_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return read_fd, write_fd


async def _serve_until_signalled(
    read_fd: int, write_fd: int, args: argparse.Namespace, *, reap_orphans: bool,
    guardian: Guardian | None, contained: bool,
) -> int:
    transport = FdTransport(read_fd, write_fd)
    status = 0
    async with trio.open_nursery() as nursery:

        async def serve_then_stop() -> None:
            nonlocal status
            status = await serve(
                transport, grace=args.grace, max_children=args.max_children,
                log_level=args.log_level, reap_orphans=reap_orphans, guardian=guardian,
                contained=contained,
            )
            nursery.cancel_scope.cancel()

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as sigs:
            nursery.start_soon(serve_then_stop)
            async for signum in sigs:
                logging.getLogger("mproxy.agent").info(
                    "received %s, stopping", signal.Signals(signum).name
                )
                # Cancelling serve() runs its teardown: children get HUP/TERM, then KILL.
                nursery.cancel_scope.cancel()
                break
    await transport.aclose()
    return status


def main(argv: Sequence[str] | None = None) -> int:
    fill_standard_fds()
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr,
        format="mproxy-agent[%(process)d] %(levelname)s %(message)s",
    )
    childproc.mark_inherited_fds_cloexec()
    childproc.raise_fd_limit()
    reap_orphans = _orphans.become_subreaper()
    # Before any thread exists (trio's run starts some), and before the protocol's fds
    # are taken: the guardian must hold none of them.
    guardian = start_guardian(args.grace)
    cgroup = _contain(guardian) if guardian is not None and args.cgroup else None
    read_fd, write_fd = _claim_stdio()
    try:
        return trio.run(functools.partial(
            _serve_until_signalled, read_fd, write_fd, args, reap_orphans=reap_orphans,
            guardian=guardian, contained=cgroup is not None))
    except KeyboardInterrupt:
        return 130
    finally:
        if cgroup is not None:
            cgroup.leave()  # first: the guardian ends whatever is still in it
        if guardian is not None:
            guardian.close()


def _contain(guardian: Guardian) -> _cgroup.Cgroup | None:
    """Move into a cgroup of our own for the guardian to end (after forking it: it must
    stay outside); None, said at debug level, where that cannot be done."""
    try:
        cgroup = _cgroup.own_cgroup()
        guardian.contain(cgroup.path)  # first: killed at any point on, nothing is left
        cgroup.enter()
    except _cgroup.NoCgroup as exc:
        logging.getLogger("mproxy.agent").debug(
            "children are not contained in a cgroup: %s", exc)
        return None
    return cgroup
