"""A worker's connection to torchrun's store, and its claim on its rank there.

torchrun's agents share one TCPStore for the whole job (``TORCHELASTIC_USE_AGENT_STORE``), at
``MASTER_ADDR:MASTER_PORT``, hosted by node 0's agent (static rendezvous) or rank 0's (c10d),
before any worker starts. A worker connects to it before its process group exists, which is
the one point where two things can go wrong silently:

- it cannot reach the store: under c10d, torch hands the workers the rank-0 agent's
  ``getfqdn()`` unless ``--local-addr`` was given, and a head whose host name resolves to
  loopback (Debian's ``127.0.1.1 hostname``) sent the other nodes' workers to their own
  loopback, where they waited torch's 30 minutes in silence. Only the network can keep a
  worker from a store that is already up, so the connection gets ``CONNECT_S``.
- its node rank is taken: without a cluster description nothing checked that two nodes were not
  given the same ``--node-rank`` (static rendezvous): torchrun started both nodes' workers as
  the same ranks, and one trained while the other said "a peer is gone", or waited 30 minutes.
  Each worker claims its node rank for its launcher in the store before joining the group; the
  workers of a second launcher stop (which then does not restart a failure on bad input).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from orch.errors import OrchError

CONNECT_S = 60
"""How long a worker tries to reach torchrun's store, which is up before the worker starts."""


class StoreUnreachable(OrchError):
    """This worker cannot reach torchrun's store: exit 2, a launch setting to fix."""


class NodeTaken(OrchError):
    """Another launcher claimed this worker's node rank: exit 2."""


def connect(world: int) -> dist.TCPStore:
    """torchrun's store at ``MASTER_ADDR:MASTER_PORT``, reached within ``CONNECT_S``, and
    then given torch's default timeout for what the process group waits for in it."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    try:
        store = dist.TCPStore(host, port, world, is_master=False,
                              timeout=timedelta(seconds=CONNECT_S))
    except (dist.DistError, RuntimeError, TimeoutError) as exc:
        raise StoreUnreachable(_unreachable(host, port, world, exc)) from None
    store.set_timeout(default_pg_timeout)
    return store


def _unreachable(host: str, port: int, world: int, exc: Exception) -> str:
    """Why torchrun's store was out of reach, and the fix: on several nodes, an address that
    is loopback here is another node's own."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    said = (f"cannot reach torchrun's store at {host}:{port} (MASTER_ADDR:MASTER_PORT) within "
            f"{CONNECT_S} s ({type(exc).__name__}: {reason})")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world > local and (loopback := _loopback(host)):
        return (f"{said}: {host} is {loopback} here, a loopback address, but the job spans "
                f"nodes (under c10d torch gives the workers the head's host name, which "
                f"resolves to loopback there, as Debian's '127.0.1.1 hostname' does); fix: pass "
                f"--local-addr THIS_NODE_IP on every node (each its own address on the network "
                f"the nodes share)")
    return (f"{said}; fix: check that this node reaches {host} (a firewall, another network), "
            "or pass --local-addr THIS_NODE_IP on every node")


def _loopback(host: str) -> str | None:
    """A loopback address ``host`` resolves to here, if any."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return None
    return next((a for a in sorted(addresses) if ipaddress.ip_address(a).is_loopback), None)


def claim_node(store: dist.Store, attempt: str, node_rank: str, node: str) -> None:
    """Claim ``node_rank`` for ``node`` (this launcher: its workers' common parent on this
    host) in torchrun's store, once per torchrun attempt (a restart claims again); NodeTaken
    where another launcher holds it. Whole nodes, not ranks: with several workers a node, two
    nodes' claims on single ranks interleaved, each lost one worker and the job failed."""
    key = f"orch/node-claim/{attempt}/{node_rank}"
    holder = store.compare_set(key, "", node).decode()
    if holder != node:
        raise NodeTaken(f"node rank {node_rank} started twice: two nodes were given --node-rank "
                        f"{node_rank}, and the other ({holder.partition(':')[0]}) took it first; "
                        "fix: give each node its own --node-rank, 0 to --nnodes - 1 (this node "
                        "stops; the others may go on as the whole job)")


def this_launcher() -> str:
    """``host:pid`` of this worker's launcher (torchrun's agent, every local worker's parent):
    what tells two launchers given one node rank apart, on one host too."""
    return f"{socket.gethostname()}:{os.getppid()}"


__all__ = ["CONNECT_S", "NodeTaken", "StoreUnreachable", "claim_node", "connect",
           "this_launcher"]
