"""Flower's Simulation Engine, sized for hundreds of virtual sites.

Two things about ``flwr.simulation.run_simulation`` (flwr 1.41) that only show
at scale, measured with ``python -m simulations.bench.scale`` and below:

* **The message sweep is quadratic in the sites.** Every 0.1 s the engine asks
  its in-memory link state, node by node, for that node's next undelivered
  message (``vce_api.add_messages_to_queue``), and each ask walks every stored
  message and re-checks its expiry under the state's lock. With ``n`` sites and
  a stage's ``n`` messages in flight a sweep is ``n**2`` checks: 19 ms at 100
  sites, 1.9 s at 1,000 (measured on this 2-core machine), so at 1,000 sites
  one of two cores only sweeps, and holds the lock that replies need.
  :func:`indexed_sweep` replaces the sweep by one that first finds the nodes
  with an undelivered message in a single pass and asks only for those: the
  same calls to the link state, in the same node order, one message per node
  per sweep, as Flower's.
* **Resources per virtual site decide the actors.** The engine runs as many
  ClientApp actors as ``cluster CPUs / client_resources.num_cpus``, and Ray sets
  each actor's ``OMP_NUM_THREADS`` to its CPUs. :func:`backend_config` gives each
  virtual site one CPU by default: on this machine two actors of one torch
  thread each, instead of one actor of two threads that the load of other
  processes slows several-fold.

The sweep is replaced only for the Flower version it was written against
(:data:`SWEEP_FLOWER_VERSION`); under any other, Flower's own runs, with a
warning in the log.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

log = logging.getLogger("fedseal.simulate")

SWEEP_FLOWER_VERSION = "1.41.0"
"""The flwr release whose ``add_messages_to_queue`` and in-memory link state
:func:`indexed_sweep` was written and tested against."""
SWEEP_INTERVAL = 0.1
"""Seconds between sweeps, as Flower's."""


def add_messages_to_queue(
    state: Any, queue: Queue, nodes_mapping: dict[int, int], f_stop: threading.Event
) -> None:
    """Flower's ``vce_api.add_messages_to_queue``, asking only nodes that have a message.

    One pass over the stored messages (under the state's lock) finds the nodes
    with an undelivered one; those nodes are then asked through the state's own
    ``get_message_ins(node_id, limit=1)``, in ``nodes_mapping``'s order, exactly
    as Flower's sweep asks every node.
    """
    while not f_stop.is_set():
        with state.lock:
            waiting = {
                msg.metadata.dst_node_id
                for msg in state.message_ins_store.values()
                if msg.metadata.delivered_at == ""
            }
        if waiting:
            for node_id in nodes_mapping:
                if node_id in waiting:
                    for msg in state.get_message_ins(node_id=node_id, limit=1):
                        queue.put(msg)
        f_stop.wait(SWEEP_INTERVAL)


@contextmanager
def indexed_sweep() -> Iterator[bool]:
    """Run Flower's Simulation Engine with :func:`add_messages_to_queue` as its sweep.

    Yields whether the sweep was replaced (only under flwr
    :data:`SWEEP_FLOWER_VERSION`, whose in-memory link state has the
    ``lock`` and ``message_ins_store`` it reads); Flower's own is put back on exit.
    """
    import flwr
    from flwr.server.superlink.fleet.vce import vce_api

    version = getattr(flwr, "__version__", "")
    if version != SWEEP_FLOWER_VERSION:
        log.warning(
            "flwr %s is not %s: keeping Flower's own message sweep, whose cost grows "
            "with the square of the sites",
            version,
            SWEEP_FLOWER_VERSION,
        )
        yield False
        return
    original = vce_api.add_messages_to_queue
    vce_api.add_messages_to_queue = add_messages_to_queue
    try:
        yield True
    finally:
        vce_api.add_messages_to_queue = original


def backend_config(
    *, ray_address: str | None = None, cpus_per_site: float = 1.0, gpu: bool = False, verbose: bool = False
) -> dict[str, Any]:
    """Flower's ``backend_config`` for the Ray backend.

    Parameters
    ----------
    ray_address : str, optional
        Join this running Ray cluster (``ray.init(address=...)``: ``HOST:PORT`` of
        its head, or ``auto``) instead of starting one on this machine; the actor
        pool then spans every node of the cluster.
    cpus_per_site : float
        CPUs Ray reserves for one virtual site's actor (and the torch threads it
        gets); the engine runs ``cluster CPUs / cpus_per_site`` actors.
    gpu : bool
        Give each actor a whole GPU (``--device cuda`` on a machine with one).
    verbose : bool
        Forward the actors' output to this console.
    """
    init: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": verbose,
    }
    if ray_address:
        init["address"] = ray_address  # the cluster's resources are its own to declare
    else:
        init.update(num_cpus=os.cpu_count() or 1, num_gpus=int(gpu))
    return {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": 1.0 if gpu else 0.0},
        "init_args": init,
    }


__all__ = ["SWEEP_FLOWER_VERSION", "add_messages_to_queue", "backend_config", "indexed_sweep"]
