"""Tensor and expert parallel: the shard pass (structure, errors), each rank's slice of the
weights, and the real thing on gloo: 2 processes (tp=2; ep=2 through the default pipeline)
and 4 processes (tp=2 with ep=2), every rank's logits equal to the single-process model's
in fp32 (1e-5 relative) and its greedy tokens equal."""
from __future__ import annotations

import datetime
import socket

import pytest
import torch
import torch.multiprocessing as mp

import kimi_graph
from kimi_graph.model import build_graph
from kimi_graph.parallel import Layout, ParallelError, parse_parallel
from kimi_graph.passes import PassError, run_pipeline
from kimi_graph.presets import TINY
from kimi_graph.weights import CheckpointSource, RandomSource, random_tensor
from reference_kimi import rel_err

IDS = torch.tensor([[1, 5, 9, 33, 2, 7], [3, 4, 5, 6, 7, 8]])
PROMPTS, NEW = [[1, 5, 9], [3]], 5


def tiny(mode="prefill", stateful=False):
    return build_graph(kimi_graph.api.resolve_config("tiny")[0], mode, stateful=stateful)


def test_shard_rewrites_one_rank():
    g = run_pipeline(tiny("decode"), "shard{tp=2,ep=2,rank=3}")
    counts = g.op_counts()
    assert counts["all_reduce"] == 8 and counts["all_gather"] == 1       # 4 layers x (attention, FFN)
    assert counts["local_experts"] == 3 and counts["moe_expert"] == 3 * 4  # 3 MoE layers, 4 of 8 experts
    groups = sorted((o.attrs["group"], o.attrs["size"]) for o in g.ops() if o.kind == "all_reduce")
    assert groups == [("tp", 2)] * 4 + [("world", 4)] * 4
    p = lambda n: g.params["@model.layers." + n].shape  # noqa: E731
    assert p("0.self_attn.q_proj.weight") == (32, 64) and p("0.self_attn.o_proj.weight") == (64, 32)
    assert p("0.self_attn.A_log") == (1, 1, 2, 1) and p("0.self_attn.f_a_proj.weight") == (16, 64)
    assert p("1.self_attn.kv_a_proj_with_mqa.weight") == (40, 64)       # the latent stays whole
    assert p("1.block_sparse_moe.experts.5.w1.weight") == (16, 64)      # ep rank 1 holds 4..7
    assert "@model.layers.1.block_sparse_moe.experts.3.w1.weight" not in g.params
    assert p("1.block_sparse_moe.shared_experts.down_proj.weight") == (64, 8)   # over 4 ranks
    assert g.params["@lm_head.weight"].shape == (128, 64) and g.types[g.outputs[0]].shape == ("B", 1, 512)
    assert g.inputs["%state.l0.kda"].shape == ("B", 2, 16, 16)          # this rank's heads' state
    assert g.inputs["%cache.l1.latent"].shape == ("B", "S", 32)
    meta = g.meta["shard"]
    assert meta["slices"]["lm_head.weight"] == [0, 384, 512, 512]
    assert "model.layers.1.block_sparse_moe.experts.0.w2.weight" in meta["elsewhere"]


def test_sharded_graph_optimizes_and_costs_its_collectives():
    g = run_pipeline(tiny("decode"), "shard{tp=2},default")
    assert "moe_expert" not in g.op_counts() and g.op_counts()["all_reduce"] == 8
    from kimi_graph.summary import graph_cost
    link = graph_cost(g, {"B": 1, "T": 1, "S": 8})["link_bytes"]
    # ring: all_reduce sends 2 (n-1)/n of its [1,1,64] f32, all_gather (n-1)/n of [1,1,512]
    assert link == 8 * 64 * 4 + 512 * 4 / 2


def test_local_experts_sends_other_ranks_copies_to_an_expert_read_anyway():
    from kimi_graph.ops import get_op
    op = get_op("local_experts")
    ids = torch.tensor([[5, 1, 6, 2], [0, 1, 2, 3], [7, 4, 0, 0]])
    w = torch.rand(3, 4) + 0.1
    got_ids, got_w = op.ref([ids, w], op.full_attrs({"first": 4, "count": 4}))
    assert got_ids.tolist() == [[1, 1, 2, 1], [0, 0, 0, 0], [3, 0, 3, 3]]
    assert torch.equal(got_w, w * ((ids >= 4) & (ids < 8)))


@pytest.mark.parametrize("pipeline, message", [
    ("shard{tp=3}", "tp=3 does not divide the 4"),
    ("shard{ep=3}", "ep=3 does not divide the 8 routed experts"),
    ("shard{tp=2,rank=2}", "rank 2 is outside the 2 ranks"),
    ("default,shard{tp=2}", "put it first"),
    ("shard{tp=2},shard{tp=2}", "sharded already"),
])
def test_shard_refuses(pipeline, message):
    with pytest.raises(PassError, match=message):
        run_pipeline(tiny(), pipeline)


def test_parallel_needs_a_process_group_and_a_layout():
    with pytest.raises(ParallelError, match="initialized torch.distributed"):
        kimi_graph.load("tiny", parallel="tp=2")
    for bad in ("tp=0", "pp=2", "tp2", "tp=2,,"):
        with pytest.raises(ParallelError):
            parse_parallel(bad)
    assert parse_parallel("tp=2, ep=4") == (2, 4)
    assert Layout(2, 2, 3).tp_rank == 1 and Layout(2, 2, 3).ep_rank == 1


def test_each_rank_reads_its_slice(tmp_path):
    from checkpoints import write_checkpoint
    write_checkpoint(tmp_path, TINY, seed=3)
    whole = CheckpointSource(tmp_path, tiny())
    for rank in range(4):
        g = run_pipeline(tiny(), f"shard{{tp=2,ep=2,rank={rank}}}")
        ckpt, rand = CheckpointSource(tmp_path, g), RandomSource(g, seed=5)
        for name, (d, start, end, _) in g.meta["shard"]["slices"].items():
            assert torch.equal(ckpt.fetch(name), whole.fetch(name).narrow(d, start, end - start))
            full = random_tensor(name, whole.types[name], 5)
            assert torch.equal(rand.fetch(name), full.narrow(d, start, end - start))


# -- several processes on gloo ------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, jobs, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=180))
    results = {}
    for parallel, pipeline, backend in jobs:
        m = kimi_graph.load("tiny", parallel=parallel, pipeline=pipeline, backend=backend)
        results[(parallel, pipeline, backend)] = (m(IDS), m.generate(PROMPTS, max_new_tokens=NEW),
                                                  m.weight_bytes)
    try:
        kimi_graph.load("tiny", parallel=f"tp={2 * world}")
    except ParallelError as e:
        results["mismatch"] = str(e)
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def _spawn(fn, world, jobs, tmp_path):
    """`world` ranks forked from a fresh fork server (imports once; forking the test process
    itself can copy a held thread-pool lock into a rank, which then hangs)."""
    mp.start_processes(fn, args=(world, _free_port(), jobs, tmp_path), nprocs=world, start_method="forkserver")


def _run_ranks(world, jobs, tmp_path):
    _spawn(_rank, world, jobs, tmp_path)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _check(ranks, jobs, world):
    refs = {}
    for parallel, pipeline, backend in jobs:
        if pipeline not in refs:
            ref = kimi_graph.load("tiny", pipeline=pipeline)
            refs[pipeline] = (ref(IDS), ref.generate(PROMPTS, max_new_tokens=NEW), ref.weight_bytes)
        logits, tokens, held = refs[pipeline]
        for r in ranks:
            got, got_tokens, got_held = r[(parallel, pipeline, backend)]
            assert rel_err(got, logits) <= 1e-5, (parallel, pipeline, backend, rel_err(got, logits))
            assert got_tokens == tokens, (parallel, pipeline, backend)
            assert got_held < 0.75 * held, (parallel, got_held, held)
    for r in ranks:
        assert f"needs tp * ep = {2 * world} processes, but the process group has {world}" in r["mismatch"]


def test_two_processes_tp_and_ep(tmp_path):
    jobs = [("tp=2", None, "interpreter"), ("ep=2", "default", "interpreter"), ("tp=2", None, "torch")]
    _check(_run_ranks(2, jobs, tmp_path), jobs, 2)


def test_four_processes_tp_with_ep(tmp_path):
    jobs = [("tp=2,ep=2", None, "interpreter")]
    _check(_run_ranks(4, jobs, tmp_path), jobs, 4)


def test_generate_parallel_needs_torchrun(capsys, monkeypatch):
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    from kimi_graph.cli import main
    assert main(["generate", "tiny", "--ids", "1,2", "--parallel", "tp=2", "--device", "cpu"]) == 2
    assert "start them with torchrun" in capsys.readouterr().err


SERVED = [([1, 5, 9], 4), ([3], 6), ([7, 7, 2, 4], 3)]


def _serving_rank(rank, world, port, jobs, out):
    """Rank 0 schedules by hand (arrivals mid-run, one cancellation); rank 1 follows."""
    import torch.distributed as dist

    from kimi_graph.runtime import SamplingParams
    from kimi_graph.runtime.replicated import FollowerScheduler, LeaderScheduler
    from kimi_graph.runtime.server import build_scheduler
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=180))
    m = kimi_graph.load("tiny", parallel="tp=2")
    if rank:
        build_scheduler(m, scheduler_class=FollowerScheduler, max_batch=2, max_len=32, prefill_chunk=2).follow()
    else:
        s = build_scheduler(m, scheduler_class=LeaderScheduler, max_batch=2, max_len=32, prefill_chunk=2)
        got = [[] for _ in SERVED] + [[]]
        sink = lambda i: lambda kind, v: got[i].append(v) if kind == "token" else None  # noqa: E731
        params = lambda n: SamplingParams(max_new_tokens=n, ignore_eos=True)  # noqa: E731
        s.submit(*SERVED[0][:1], params(SERVED[0][1]), sink(0))
        doomed = s.submit([4, 4], params(20), sink(3))
        s.step()
        for i in (1, 2):
            s.submit(SERVED[i][0], params(SERVED[i][1]), sink(i))
        s.step()
        s.cancel(doomed)
        while not s.idle:
            s.step()
        s.stop()
        torch.save(got, out / "served.pt")
    dist.destroy_process_group()


def test_serving_ranks_replay_rank_zeros_steps(tmp_path):
    _spawn(_serving_rank, 2, [], tmp_path)
    got = torch.load(tmp_path / "served.pt")
    ref = kimi_graph.load("tiny")
    assert got[:3] == [ref.generate([p], max_new_tokens=n)[0] for p, n in SERVED]
    assert 1 <= len(got[3]) < 20                     # cancelled after its first tokens


def test_inspect_shows_a_ranks_weights_and_link_bytes(capsys):
    import json

    from kimi_graph.cli import main
    facts = {}
    for pipeline in ("default", "shard{tp=2,ep=2},default"):
        assert main(["inspect", "tiny", "--json", "--no-ir", "--mode", "decode", "--pipeline", pipeline]) == 0
        facts[pipeline] = json.loads(capsys.readouterr().out)
    whole, part = facts["default"], facts["shard{tp=2,ep=2},default"]
    assert part["weight_bytes"] < 0.5 * whole["weight_bytes"]
    assert whole["pipeline"]["after"]["link_bytes_per_token"] == 0
    assert part["pipeline"]["after"]["link_bytes_per_token"] > 0
    assert part["pipeline"]["after"]["op_counts"]["all_reduce"] == 8
