"""Benchmark of fedseal's SecAgg+ (``fedseal.common.secagg``) against Flower's mask generation.

Usage::

    python -m simulations.bench.secagg --json OUT [--quick]

For every vector size and cohort size ``n`` it runs one real in-memory SecAgg+
round (:class:`~fedseal.common.secagg.ClientState` / :class:`~fedseal.common.secagg.ServerState`)
with the active-adversary protection on: P-384 site signatures checked against a
roster, share commitments, the consistency round, and measures:

* ``client_mask_s``: one client's stage-2 cost, i.e. the real
  :meth:`ClientState.masked_input` (decrypt ``k`` share ciphertexts and check
  them against their commitments, ``k`` X25519 + HKDF agreements, ``k + 1``
  AES-CTR mask expansions via :func:`~fedseal.common.secagg.prg.expand_mask`, ``uint32``
  additions). The client state is exported after stage 1 and restored before
  each repetition.
* ``client_round_s``: the same client's whole protocol cost in the round, all
  five stages (making and signing keys, checking ``k`` neighbours' signed keys,
  dealing and committing shares, masking, checking and signing the survivor
  view, checking the view signatures of its neighbourhoods and revealing);
  the per-stage times are in ``client_stage_s``.
* ``flower_mask_s``: the same stage of Flower's ``secaggplus_mod``
  (``_collect_masked_vectors``, flwr 1.41): decrypt ``k`` Fernet share
  ciphertexts, ``k`` ECDH (P-384) + HKDF shared keys, ``k + 1`` calls of
  ``flwr.common.secure_aggregation.secaggplus_utils.pseudo_rand_gen`` over the
  update's shapes (``[(1,), (L,)]``: weight factor + flat update), combined with
  Flower's ``parameters_addition`` / ``parameters_subtraction`` /
  ``parameters_mod`` exactly as Flower does. Quantization is excluded on both
  sides.
* ``server_unmask_s``: :meth:`ServerState.collect_signatures` +
  :meth:`ServerState.finalize` for the same round with 10% of the nodes dropped
  after sharing keys, so dropped pairwise masks are regenerated. Skipped
  (``null`` with a reason) when its estimated cost exceeds the budget.
* bytes one client uploads (every encoded message, as sent), compared with
  sending the plain float32 update, and the key material it downloads.

Client timings are the median of 3 repetitions; server timings are single runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedseal.common.secagg import (
    ClientState,
    RoundContext,
    ServerState,
    ShareMessage,
    default_k,
    default_threshold,
    generate_key_pair,
    make_identities,
)
from fedseal.common.secagg.messages import pack_var_table
from fedseal.common.secagg.protocol import B_SHARES, SEEDS, SK_SHARES
from fedseal.common.secagg_wire import pack_ids, pack_routed, pack_shares, pack_table
from simulations.bench.report import emit_report, setup_bench_logging

log = logging.getLogger("fedseal.bench.secagg")

FULL_LENGTH = 22_713_216
"""Trainable parameters of all-MiniLM-L6-v2 fine-tuned in full."""
LORA_LENGTH = 74_498
"""What fedseal's default sends: LoRA r=8 on query/value of MiniLM's 6 layers
(6 x 2 x 2 x 384 x 8 = 73,728) plus the 2-label head (770)."""

FULL_SIZES: dict[str, int] = {"full": FULL_LENGTH, "lora": LORA_LENGTH}
FULL_NS: tuple[int, ...] = (10, 50, 100)
QUICK_SIZES: dict[str, int] = {"quick_200k": 200_000, "quick_20k": 20_000}
QUICK_NS: tuple[int, ...] = (5, 10)

CLIENT_REPS = 3
DROP_FRACTION = 0.10
SERVER_BUDGET_S = 60.0
"""Skip a server measurement whose estimated unmask time exceeds this."""

FLOWER_MOD_RANGE = 2**32
"""Flower's default ``modulus_range`` of ``SecAggPlusWorkflow``."""

CLIENT_METHOD = (
    "real ClientState.masked_input on a real round (state exported after stage 1 and "
    "restored before each repetition); includes decrypting k share ciphertexts and "
    "checking their commitments, k X25519+HKDF agreements and k+1 expand_mask "
    "(AES-256-CTR) expansions"
)
FLOWER_METHOD = (
    "flwr 1.41 secaggplus_mod._collect_masked_vectors masking steps with Flower's own "
    "functions: k Fernet decrypts, k generate_shared_key (ECDH P-384 + HKDF), k+1 "
    "pseudo_rand_gen(seed, 2**32, [(1,), (L,)]), parameters_addition/subtraction, "
    "parameters_mod; quantization excluded"
)


def _median_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    """Median wall time of ``reps`` calls of ``fn`` and the last return value."""
    times: list[float] = []
    out: Any = None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _drop_set(ids: Sequence[int], protect: int) -> list[int]:
    """Evenly spread ~10% of the nodes (never ``protect``) that drop after sharing keys."""
    n = len(ids)
    n_drop = max(1, round(DROP_FRACTION * n))
    step = n // n_drop
    picks = [ids[(step // 2 + j * step) % n] for j in range(n_drop)]
    return [i for i in picks if i != protect]


class _Round:
    """One SecAgg+ round driven through stages 0-1, ready for masking."""

    def __init__(self, n: int, length: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        ids: set[int] = set()
        while len(ids) < n:
            ids.add(int(self.rng.integers(1, 2**63)))
        self.ids = sorted(ids)
        self.length = length
        self.k = min(default_k(n), n - 1)
        self.threshold = default_threshold(self.k)
        self.identities, self.roster = make_identities(self.ids, "p384")
        challenge_sk, challenge_pk = generate_key_pair()
        self.ctx = RoundContext(2**63 + 1, 1, self.ids, self.k, self.threshold, challenge_pk)
        self.server = ServerState(self.ctx, challenge_private=challenge_sk, vector_length=length)
        self.clients = {
            i: ClientState(i, self.ctx, identity=self.identities[i], roster=self.roster) for i in self.ids
        }
        self.stage_s: dict[str, float] = {}
        target = self.ids[0]
        adverts = {}
        for i, client in self.clients.items():
            start = time.perf_counter()
            adverts[i] = client.advertise_keys().encode(self.ctx.digest)
            if i == target:
                self.stage_s["advertise"] = time.perf_counter() - start
        self.adverts = adverts
        self.bundles, rejected = self.server.collect_adverts(adverts)
        assert not rejected, rejected
        self.shares = {}
        for i in self.bundles:
            start = time.perf_counter()
            message, cts = self.clients[i].share_keys(self.bundles[i])
            if i == target:
                self.stage_s["share_keys"] = time.perf_counter() - start
            self.shares[i] = (message.encode(self.ctx.digest), cts)
        self.routed, rejected = self.server.collect_shares(self.shares)
        assert not rejected, rejected
        # Stored exactly as a Flower ClientApp would keep them in Context.state.
        self.saved = {i: c.export_state() for i, c in self.clients.items()}
        del self.clients

    def restore(self, node: int) -> ClientState:
        return ClientState.restore_state(self.saved[node], identity=self.identities[node], roster=self.roster)

    def opened(self, node: int) -> dict[int, tuple[ShareMessage, bytes]]:
        return {s: (ShareMessage.decode(m)[0], ct) for s, (m, ct) in self.routed[node].items()}

    def vector(self) -> np.ndarray:
        return self.rng.integers(0, 2**32, size=self.length, dtype=np.uint32)


def _time_client(rnd: _Round, node: int, x: np.ndarray, reps: int) -> tuple[float, np.ndarray]:
    """Median time of ``node``'s real ``masked_input``; restoring is not timed.

    Afterwards ``rnd.saved[node]`` holds the node's state after masking.
    """
    times: list[float] = []
    y: np.ndarray | None = None
    state: ClientState | None = None
    opened = rnd.opened(node)
    for _ in range(reps):
        state = rnd.restore(node)
        start = time.perf_counter()
        y, complaints = state.masked_input(opened, x)
        times.append(time.perf_counter() - start)
        assert not complaints
    assert y is not None and state is not None
    rnd.saved[node] = state.export_state()
    return statistics.median(times), y


def _time_flower(length: int, k: int, reps: int, seed: int) -> tuple[float, int]:
    """Flower's stage-2 masking for one client with ``k`` neighbours.

    Returns the median time and the size of the serialised masked update Flower
    uploads (``ndarray_to_bytes`` of every array).
    """
    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
        decrypt,
        encrypt,
        generate_shared_key,
    )
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        parameters_addition,
        parameters_mod,
        parameters_subtraction,
    )
    from flwr.common.secure_aggregation.secaggplus_utils import (
        pseudo_rand_gen,
        share_keys_plaintext_concat,
        share_keys_plaintext_separate,
    )
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        generate_key_pairs,
        private_key_to_bytes,
        public_key_to_bytes,
    )

    rng = np.random.default_rng(seed)
    nid = 1_000
    pairs = [generate_key_pairs() for _ in range(2)]  # (sk1, pk1), (sk2, pk2)
    sk1 = private_key_to_bytes(pairs[0][0])
    sk2 = private_key_to_bytes(pairs[1][0])
    peers: dict[int, tuple[bytes, bytes]] = {}
    for j in range(k):
        peer_id = nid + (j - k // 2 if j < k // 2 else j - k // 2 + 1)
        peers[peer_id] = (
            public_key_to_bytes(generate_key_pairs()[1]),
            public_key_to_bytes(generate_key_pairs()[1]),
        )
    ss2 = {
        p: generate_shared_key(bytes_to_private_key(sk2), bytes_to_public_key(pk2))
        for p, (_, pk2) in peers.items()
    }
    ciphertexts = {
        p: encrypt(key, share_keys_plaintext_concat(p, nid, os.urandom(48), os.urandom(48)))
        for p, key in ss2.items()
    }
    rd_seed = os.urandom(32)
    # Flower's quantize() returns int32 arrays; factor_combine prepends the weight.
    quantized = factor_combine(123_456, [rng.integers(0, 2**22, size=length - 1, dtype=np.int32)])

    def once() -> list[np.ndarray]:
        available: list[int] = []
        for src, ct in ciphertexts.items():
            plaintext = decrypt(ss2[src], ct)
            actual_src, dst, _, _ = share_keys_plaintext_separate(plaintext)
            assert actual_src == src and dst == nid
            available.append(src)
        params = quantized
        dimensions_list: list[tuple[int, ...]] = [a.shape for a in params]
        private_mask = pseudo_rand_gen(rd_seed, FLOWER_MOD_RANGE, dimensions_list)
        params = parameters_addition(params, private_mask)
        for node_id in available:
            shared_key = generate_shared_key(
                bytes_to_private_key(sk1), bytes_to_public_key(peers[node_id][0])
            )
            pairwise_mask = pseudo_rand_gen(shared_key, FLOWER_MOD_RANGE, dimensions_list)
            if nid > node_id:
                params = parameters_addition(params, pairwise_mask)
            else:
                params = parameters_subtraction(params, pairwise_mask)
        return parameters_mod(params, FLOWER_MOD_RANGE)

    elapsed, masked = _median_time(once, reps)
    upload = sum(len(ndarray_to_bytes(a)) for a in masked)
    return elapsed, upload


class _MaskedInputs(Mapping):
    """Every surviving client's masked input, computed when the server reads it (so a
    full-size round never holds them all), with the plain sum kept on the side."""

    def __init__(self, rnd: _Round, nodes: list[int], done: dict[int, np.ndarray]) -> None:
        self.rnd, self.nodes, self.done = rnd, nodes, done
        self.expected = np.zeros(rnd.length, dtype=np.uint32)

    def __getitem__(self, node: int) -> tuple[np.ndarray, dict[int, bytes]]:
        if node in self.done:
            return self.done.pop(node), {}
        x = self.rnd.vector()
        np.add(self.expected, x, out=self.expected)
        state = self.rnd.restore(node)
        y, complaints = state.masked_input(self.rnd.opened(node), x)
        self.rnd.saved[node] = state.export_state()
        return y, complaints

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)


def _server_round(
    rnd: _Round,
    target: int,
    target_x: np.ndarray,
    target_y: np.ndarray,
    dropped: list[int],
) -> dict[str, Any]:
    """Mask every other client's input; time the target's view signing and unmasking and
    the server's signature check and unmasking."""
    start = time.perf_counter()
    survivors = [i for i in rnd.ids if i not in dropped]
    masked = _MaskedInputs(rnd, survivors, {target: target_y})
    np.add(masked.expected, target_x, out=masked.expected)
    view, rejected = rnd.server.collect_masked(masked)
    assert not rejected, rejected
    signatures, stage_s = {}, {}
    for i in rnd.server.survivors:
        state = rnd.restore(i)
        begin = time.perf_counter()
        signatures[i] = state.sign_view(view)
        if i == target:
            stage_s["sign_view"] = time.perf_counter() - begin
        rnd.saved[i] = state.export_state()
    setup = time.perf_counter() - start

    start = time.perf_counter()
    relays, rejected = rnd.server.collect_signatures(signatures)
    signatures_s = time.perf_counter() - start
    assert not rejected, rejected
    replies = {}
    for i in relays:
        state = rnd.restore(i)
        begin = time.perf_counter()
        replies[i] = state.unmask(view, relays[i])
        if i == target:
            stage_s["unmask"] = time.perf_counter() - begin
    start = time.perf_counter()
    total, rejected = rnd.server.finalize(replies)
    finalize_s = time.perf_counter() - start
    assert not rejected, rejected
    reply = replies[target]
    return {
        "server_unmask_s": signatures_s + finalize_s,
        "server_exact": bool(np.array_equal(total, masked.expected)),
        "server_dropped": len(rnd.server.dropped),
        "server_round_setup_s": setup,
        "stage_s": stage_s,
        "upload": {
            "view_signature": len(signatures[target]),
            "unmask": len(pack_shares(reply[B_SHARES]))
            + len(pack_shares(reply[SK_SHARES]))
            + len(pack_table(reply[SEEDS])),
        },
        "download": {"view": len(view), "view_signatures": len(pack_var_table(relays[target]))},
    }


def _estimate_server_s(rnd: _Round, dropped: list[int], per_mask_s: float) -> float:
    """Unmask cost estimate: survivors' self-masks + dropped nodes' live pairwise masks."""
    drop = set(dropped)
    expansions = len(rnd.ids) - len(drop)
    for j in drop:
        expansions += sum(1 for i in rnd.server.graph[j] if i not in drop)
    return expansions * per_mask_s


def bench_case(
    size_name: str,
    length: int,
    n: int,
    *,
    reps: int,
    server_budget_s: float,
    seed: int,
) -> dict[str, Any]:
    """Measure one (vector size, cohort size) combination."""
    log.info("size=%s (L=%d) n=%d: setting up a real round", size_name, length, n)
    vector_length = length + 1  # the weight rides inside the masked vector
    rnd = _Round(n, vector_length, seed)
    target = rnd.ids[0]
    dropped = _drop_set(rnd.ids, target)
    x = rnd.vector()
    client_s, y = _time_client(rnd, target, x, reps)
    log.info("  fedseal client mask: %.4f s", client_s)
    flower_s, flower_upload = _time_flower(vector_length, rnd.k, reps, seed)
    log.info("  flower client mask:  %.4f s", flower_s)

    message, cts = rnd.shares[target]
    upload = {
        "advert": len(rnd.adverts[target]),
        "share_message": len(message),
        "ciphertexts": len(pack_table(cts)),
        "complaints": len(pack_table({})),
    }
    download = {
        "round_parameters": len(pack_ids(rnd.ids)) + 32 + 12,
        "bundle": len(pack_var_table({j: a.encode(rnd.ctx.digest) for j, a in rnd.bundles[target].items()})),
        "routed_shares": len(pack_routed(rnd.routed[target])),
    }
    row: dict[str, Any] = {
        "size_name": size_name,
        "length": length,
        "masked_vector_length": vector_length,
        "n": n,
        "k": rnd.k,
        "threshold": rnd.threshold,
        "client_mask_s": client_s,
        "client_mask_method": "ClientState.masked_input",
        "flower_mask_s": flower_s,
        "speedup": flower_s / client_s,
        "client_round_s": None,
        "client_stage_s": {**rnd.stage_s, "masked_input": client_s},
        "server_unmask_s": None,
        "server_unmask_reason": None,
    }
    per_mask = client_s / (rnd.k + 1)
    estimate = _estimate_server_s(rnd, dropped, per_mask)
    if estimate > server_budget_s:
        row["server_unmask_reason"] = (
            f"skipped: estimated {estimate:.0f} s (> {server_budget_s:.0f} s budget) from "
            f"{per_mask * 1e3:.1f} ms per mask expansion"
        )
        log.info("  server: %s", row["server_unmask_reason"])
    else:
        server = _server_round(rnd, target, x, y, dropped)
        row["client_stage_s"].update(server.pop("stage_s"))
        row["client_round_s"] = sum(row["client_stage_s"].values())
        upload.update(server.pop("upload"))
        download.update(server.pop("download"))
        row.update(server)
        row["server_unmask_reason"] = (
            f"measured once: {server['server_dropped']} of {n} nodes dropped after sharing keys"
        )
        log.info(
            "  client round: %.4f s; server unmask: %.3f s (exact=%s)",
            row["client_round_s"],
            server["server_unmask_s"],
            server["server_exact"],
        )
    masked_bytes = 4 * vector_length
    key_material = sum(upload.values())
    plain = 4 * length + 4
    bytes_per_client = masked_bytes + key_material
    row.update(
        {
            "bytes_per_client": bytes_per_client,
            "masked_vector_bytes": masked_bytes,
            "key_material_bytes": key_material,
            "key_material_upload": upload,
            "key_material_download": download,
            "download_key_material_bytes": sum(download.values()),
            "share_ciphertexts": len(cts),
            "plain_update_bytes": plain,
            "bytes_ratio": bytes_per_client / (plain + key_material),
            "bytes_ratio_vs_plain": bytes_per_client / plain,
            "flower_masked_upload_bytes": flower_upload,
        }
    )
    return row


def _machine() -> dict[str, Any]:
    import cryptography

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
    }
    try:
        import flwr

        info["flwr"] = flwr.__version__
    except ImportError:  # pragma: no cover - flwr is a project dependency
        info["flwr"] = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def run_benchmark(
    sizes: dict[str, int],
    ns: Sequence[int],
    *,
    reps: int = CLIENT_REPS,
    server_budget_s: float = SERVER_BUDGET_S,
    quick: bool = False,
) -> dict[str, Any]:
    """Run every (size, n) case and return the JSON-ready report."""
    start = time.perf_counter()
    results = [
        bench_case(name, length, n, reps=reps, server_budget_s=server_budget_s, seed=1000 * idx + n)
        for idx, (name, length) in enumerate(sizes.items())
        for n in ns
    ]
    notes = [
        f"client_mask_s: {CLIENT_METHOD}; median of {reps} runs.",
        f"flower_mask_s: {FLOWER_METHOD}; median of {reps} runs.",
        "speedup = flower_mask_s / client_mask_s.",
        "k = min(default_k(n), n - 1), the effective neighbour count; threshold = default_threshold(k).",
        "The masked vector has length+1 uint32 entries (the weight rides inside); "
        "Flower's update is [(1,) weight factor, (length,) params].",
        "client_round_s: the target client's whole protocol cost in the round, the sum of "
        "client_stage_s (advertise, share_keys, masked_input, sign_view, unmask; P-384 "
        "signatures); null when the server part is skipped.",
        f"server_unmask_s: ServerState.collect_signatures + finalize, one run, "
        f"{DROP_FRACTION:.0%} of nodes (evenly spread, min 1) drop after sharing keys; "
        f"null when estimated above {server_budget_s:.0f} s. server_round_setup_s (not "
        "part of server_unmask_s) is the time to mask all other clients' inputs and have "
        "them sign the survivor view.",
        "bytes_per_client = masked vector (4 B/entry) + key material the client uploads, "
        "every message as encoded on the wire (key_material_upload: signed advert, signed "
        "share message with commitments, share ciphertexts, complaints, view signature, "
        "revealed shares and seeds); Flower record framing excluded. plain_update_bytes = "
        "4 B/entry float32 + 4 B weight. bytes_ratio = bytes_per_client / "
        "(plain_update_bytes + key material), i.e. 1.0 because the uint32 masked vector is "
        "exactly as large as the float32 update + weight; bytes_ratio_vs_plain is the real "
        "overhead. download_key_material_bytes: what the client receives besides the "
        "global model (key_material_download).",
        "flower_masked_upload_bytes: serialised size (ndarray_to_bytes) of Flower's masked "
        "int64 arrays for the same update, without its key material.",
        "Flower's pseudo_rand_gen folds each seed to 32 bits and uses numpy's MT19937 "
        "RandomState; fedseal expands full 256-bit seeds with AES-256-CTR.",
    ]
    if quick:
        notes.insert(0, "--quick run: tiny vector sizes, not the real model sizes.")
    return {
        "machine": _machine(),
        "config": {
            "quick": quick,
            "sizes": sizes,
            "n": list(ns),
            "client_reps": reps,
            "server_budget_s": server_budget_s,
        },
        "results": results,
        "notes": notes,
        "total_s": time.perf_counter() - start,
    }


def round_overhead(
    n: int = 10, local_steps: int = 5, model: str = "default", rounds: int = 4
) -> dict[str, Any]:
    """Round time with secure aggregation over without, same simulated federation.

    Both runs use the real ClientApp and ServerApp over the in-process grid
    (:mod:`simulations.bench.local_grid`), MiniLM with LoRA and DP on, ``n`` sites.
    The median of rounds 2 .. ``rounds`` of each run is timed, so one-off costs
    (model load, noise calibration) do not count, and one slow round of DP
    training (its time varies from round to round by more than the protocol
    costs) does not decide the ratio.
    """
    import tempfile

    from fedseal.common.config import FedConfig
    from fedseal.server.app import run_federation
    from fedseal.simulations.simulate import prepare_sites
    from simulations.bench.local_grid import RUN_ID, LocalGrid

    seconds, rounds_s = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for secagg in (False, True):
            cfg = prepare_sites(
                FedConfig(
                    model=model,
                    finetune="lora",
                    clients=n,
                    min_clients=n,
                    rounds=rounds,
                    local_steps=local_steps,
                    max_length=32,
                    secagg=secagg,
                    out=f"{tmp}/secagg-{secagg}",
                )
            )
            run_federation(LocalGrid(n), cfg, run_id=RUN_ID)
            rows = [json.loads(line) for line in Path(cfg.out, "metrics.jsonl").read_text().splitlines()]
            rounds_s[secagg] = [r["seconds"] for r in rows[1:]]
            seconds[secagg] = statistics.median(rounds_s[secagg])
    return {
        "n": n,
        "model": model,
        "finetune": "lora",
        "local_steps": local_steps,
        "rounds_timed": rounds - 1,
        "rounds_s_plain": rounds_s[False],
        "rounds_s_secagg": rounds_s[True],
        "round_s_plain": seconds[False],
        "round_s_secagg": seconds[True],
        "round_overhead_ratio": seconds[True] / seconds[False],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: run the benchmark, write and print the JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.bench.secagg", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", type=Path, required=True, help="where to write the JSON")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and n in (5, 10); finishes in seconds"
    )
    parser.add_argument(
        "--server-budget",
        type=float,
        default=SERVER_BUDGET_S,
        help="skip server measurements estimated above this many seconds",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_bench_logging(args.log_level)
    sizes, ns = (QUICK_SIZES, QUICK_NS) if args.quick else (FULL_SIZES, FULL_NS)
    report = run_benchmark(sizes, ns, server_budget_s=args.server_budget, quick=args.quick)
    if args.quick:
        report["round_overhead"] = None
        report["notes"].append("round_overhead: skipped in --quick (it trains a real model).")
    else:
        report["round_overhead"] = round_overhead()
    emit_report(report, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
