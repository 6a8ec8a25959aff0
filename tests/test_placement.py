"""Expert placement: device files and presets, the statistics format, the cost model, EPLB as
written from its description, and the "Done means" properties of the placement itself."""

from __future__ import annotations

import copy
import tomllib

import numpy as np
import pytest

from mocompile.errors import MocompileError
from mocompile.placement.baselines import balanced_packing, eplb, replicate
from mocompile.placement.cost import ExpertShape, LayerCost
from mocompile.placement.devices import parse_cluster
from mocompile.placement.plan import make_plan
from mocompile.placement.presets import PRESETS, preset, preset_toml
from mocompile.placement.stats import ExpertStats, LayerStats, from_choices, parse_stats, zipf_stats

SHAPE = ExpertShape(hidden=2048, inner=1408, gated=True, dtype="bf16")  # a DeepSeek-V2-Lite-sized expert


def gpus(n: int, tflops: list[float] | None = None, memory_gib: float = 80, nodes: int = 1) -> dict:
    per = n // nodes
    return {"name": f"{n}gpu", "network": {"intra_node": {"gb_per_s": 450, "latency_us": 2},
                                           "inter_node": {"gb_per_s": 50, "latency_us": 5}},
            "device": [{"name": f"gpu{i}", "kind": "gpu", "node": f"node{i // per}", "memory_gib": memory_gib,
                        "memory_gb_per_s": 3350, "tflops": {"bf16": (tflops or [989] * n)[i]}} for i in range(n)]}


def stats_of(tokens: list[float] | np.ndarray, co: np.ndarray | None = None, **model) -> ExpertStats:
    return ExpertStats({0: LayerStats(np.asarray(tokens, dtype=np.float64), co)}, model)


# ---- devices -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_load_and_read_back_from_their_toml(name: str) -> None:
    cluster = preset(name)
    again = parse_cluster(tomllib.loads(preset_toml(name)), "toml")
    assert [d for d in again.devices] == cluster.devices
    assert (again.intra_node, again.inter_node, again.links) == (cluster.intra_node, cluster.inter_node, cluster.links)


def test_preset_shapes() -> None:
    big = preset("8node-64gpu")
    assert len(big.devices) == 64 and len(big.nodes) == 8 and {d.kind for d in big.devices} == {"gpu"}
    assert [len(preset(n).nodes) for n in ("1node-8gpu", "2node-4gpu")] == [1, 2]
    assert {d.kind for d in preset("gpu+cpu").devices} == {"gpu", "cpu"}
    assert {d.kind for d in preset("gpu+fpga").devices} == {"gpu", "fpga"}
    mixed = preset("gpu+cpu")
    assert mixed.link(*mixed.devices).gb_per_s == 64  # PCIe, not the NVLink default


@pytest.mark.parametrize("change, message", [
    (lambda d: d["device"][0].update(memroy_gib=1), "device 'gpu0': unknown key 'memroy_gib'"),
    (lambda d: d["device"][0].update(memory_gib=-8), "device 'gpu0': memory_gib must be positive, got -8"),
    (lambda d: d["device"][0]["tflops"].update(bf16=-1), "tflops.bf16 must be positive"),
    (lambda d: d["device"][0].update(kind="tpu"), "kind must be one of gpu, cpu, fpga"),
    (lambda d: d["network"]["intra_node"].update(gb_per_s=0), "network.intra_node: gb_per_s must be positive"),
    (lambda d: d.update(link=[{"between": ["gpu0", "gpu9"], "gb_per_s": 1, "latency_us": 1}]),
     "link 1: names device 'gpu9', which is not defined"),
    (lambda d: d.update(links=[]), "unknown key 'links'"),
    (lambda d: d["device"].append(dict(d["device"][0])), "two devices are named 'gpu0'"),
    (lambda d: d["device"][0].pop("node"), "device 'gpu0': missing node"),
])
def test_bad_device_documents_fail_in_one_line(change, message: str) -> None:
    doc = gpus(2)
    change(doc)
    with pytest.raises(MocompileError) as e:
        parse_cluster(doc, "c.toml")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("c.toml: ")


# ---- statistics ---------------------------------------------------------------------------------------------


def test_statistics_round_trip_and_counts() -> None:
    choices = np.array([[0, 1], [0, 2], [1, 0], [3, -1]])  # -1: a slot that was not served
    layer = from_choices(choices, 4)
    assert layer.tokens.tolist() == [3, 2, 1, 1]
    assert layer.coactivation[0, 1] == 2 and layer.coactivation[0, 2] == 1 and layer.coactivation[0, 0] == 0
    stats = ExpertStats({3: layer}, {"top_k": 2}, "test")
    again = parse_stats(stats.to_json(), "s.json")
    assert again.layers[3].tokens.tolist() == layer.tokens.tolist()
    assert np.array_equal(again.layers[3].coactivation, layer.coactivation) and again.model == {"top_k": 2}


@pytest.mark.parametrize("doc, message", [
    ({"layers": {}}, "at least one layer"),
    ({"layers": {"x": {"tokens": [1]}}}, "layer 'x': a layer key is the layer's index"),
    ({"layers": {"0": {"tokens": [1, -2]}}}, "layer '0': tokens[1] = -2 is not a non-negative count"),
    ({"layers": {"0": {"tokens": [1, 2], "coactivation": [[0, 1], [0, 0]]}}}, "coactivation is not symmetric"),
    ({"layers": {"0": {"tokens": [1, 2], "coactivation": [[0, 2], [2, 0]]}}}, "exceeds the tokens of expert 0"),
    ({"layers": {"0": {"tokens": [1, 2], "coactivation": [[0, 1]]}}}, "must be a 2 x 2 list"),
    ({"layers": {"0": {"tokens": [1], "load": 3}}}, "unknown key 'load'"),
    ({"layers": {"0": {"tokens": [1]}}, "model": {"hidden": 0}}, "model.hidden must be a positive integer"),
])
def test_bad_statistics_fail_in_one_line(doc: dict, message: str) -> None:
    with pytest.raises(MocompileError) as e:
        parse_stats(doc, "s.json")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_zipf_statistics_are_skewed_and_consistent() -> None:
    stats = zipf_stats(64, 6, 2000, 1.2, seed=3, n_group=8, topk_group=4)
    layer = stats.layers[0]
    assert layer.tokens.sum() == 2000 * 6
    assert np.allclose(layer.coactivation.sum(1), layer.tokens * 5)  # each token's other 5 choices
    top = np.sort(layer.tokens)[::-1]
    assert top[0] > 5 * np.median(top)


def test_incremental_cost_equals_the_full_one() -> None:
    """The local search prices a change from kept state (in Python up to cost.SMALL experts on the device,
    with arrays above); it must agree with pricing from scratch."""
    stats = zipf_stats(24, 4, 500, 1.0, seed=2)
    cost = LayerCost(preset("2node-4gpu"), SHAPE, stats.layers[0].tokens, stats.layers[0].coactivation)
    rng = np.random.default_rng(0)
    for _ in range(200):
        held = {int(e): float(rng.uniform(0.1, 1)) for e in rng.choice(24, size=rng.integers(1, 20), replace=False)}
        remove = tuple(int(e) for e in rng.choice(list(held), size=rng.integers(0, len(held) + 1), replace=False))
        add = {int(e): float(rng.uniform(0.1, 1)) for e in rng.choice(24, size=rng.integers(0, 3), replace=False)
               if e not in held or e in remove}
        after = {e: s for e, s in held.items() if e not in remove} | add
        d = int(rng.integers(0, 8))
        got = cost.changed(d, held, cost.arrays(held), cost.device(d, held).tokens, remove, add)
        want = cost.device(d, after)
        assert (got.tokens, got.compute_s, got.comm_s, got.dispatched) == pytest.approx(
            (want.tokens, want.compute_s, want.comm_s, want.dispatched), rel=1e-9, abs=1e-15)


# ---- EPLB as described ------------------------------------------------------------------------------------


def test_eplb_steps() -> None:
    assert replicate(np.array([10.0, 1, 1, 1]), 6) == [3, 1, 1, 1]
    pack = balanced_packing(np.array([8.0, 7, 2, 1]), 2)
    assert sorted(pack) == [0, 0, 1, 1] and pack[0] != pack[1]
    # hierarchical: 4 groups of 4 over 2 nodes of 2 devices: every group stays inside one node
    load = np.random.default_rng(0).random(16) * 100
    placement = eplb(load, 4, n_group=4, nodes=[[0, 1], [2, 3]])
    node_of = {e: d // 2 for d, held in enumerate(placement) for e in held}
    for g in range(4):
        assert len({node_of[e] for e in range(4 * g, 4 * g + 4)}) == 1
    assert [len(h) for h in placement] == [5, 5, 5, 5] or sum(len(h) for h in placement) < 20  # same-device replicas merge
    shares = np.zeros(16)
    for held in placement:
        for e, s in held.items():
            shares[e] += s
    assert np.allclose(shares, 1)


# ---- the "Done means" properties ------------------------------------------------------------------------


def test_plan_never_exceeds_device_memory() -> None:
    rng = np.random.default_rng(1)
    for trial in range(6):
        memory = list(rng.uniform(0.16, 0.3, size=4))  # GiB: 4 to 9 experts of 17.3 MB per device and layer
        doc = gpus(4)
        for d, m in zip(doc["device"], memory):
            d["memory_gib"] = float(m)
        cluster = parse_cluster(doc, "c")
        stats = zipf_stats(16, 4, 800, 1.0, layers=2, seed=trial)
        plan = make_plan(stats, cluster, SHAPE, max_rounds=60)
        used = [row["memory_bytes"] for row in plan.to_json()["devices"]]
        assert all(u <= dev.memory_bytes for u, dev in zip(used, cluster.devices))
        assert max(u / dev.memory_bytes for u, dev in zip(used, cluster.devices)) > 0.5  # memory was a constraint


def test_replication_and_packing_even_out_a_skewed_load() -> None:
    tokens = np.full(32, 100.0)
    tokens[[0, 8, 16]] = [3000, 2000, 1500]  # hot experts that round-robin puts on one device
    plan = make_plan(stats_of(tokens), parse_cluster(gpus(8), "c"), SHAPE, replicas=8)
    assert plan.round_robin.imbalance > 2
    assert plan.placed.imbalance < 1.1
    assert plan.placed.step_time_s < plan.round_robin.step_time_s / 2


def test_coactivated_experts_share_a_device_when_that_saves_traffic() -> None:
    # experts 0 and 1 are always chosen together, as are 2 and 3: round-robin (and EPLB, on
    # these even loads) split every pair, so every token is sent to both devices.
    choices = np.array([[0, 1]] * 500 + [[2, 3]] * 500)
    layer = from_choices(choices, 4)
    plan = make_plan(ExpertStats({0: layer}, {"top_k": 2}), parse_cluster(gpus(2), "c"), SHAPE, replicas=0)
    held = [set(h) for h in plan.placed.layers[0].placement]
    assert sorted(map(sorted, held)) == [[0, 1], [2, 3]]
    assert plan.placed.traffic_bytes < plan.round_robin.traffic_bytes * 0.6
    assert plan.placed.traffic_bytes < plan.eplb.traffic_bytes * 0.6
    cost = LayerCost(plan.cluster, SHAPE, layer.tokens, layer.coactivation)
    split = [{0: 1.0, 2: 1.0}, {1: 1.0, 3: 1.0}]
    assert cost.time(plan.placed.layers[0].placement) < cost.time(split)


def test_a_faster_device_gets_more_tokens() -> None:
    cluster = parse_cluster(gpus(2, tflops=[400, 1200]), "c")
    plan = make_plan(stats_of(np.full(16, 1000.0)), cluster, SHAPE, replicas=2)
    slow, fast = (c.tokens for c in plan.placed.layers[0].costs)
    assert fast > 2 * slow  # 3x the speed: about 3x the tokens
    assert plan.placed.step_time_s < plan.eplb.step_time_s


def test_a_gpu_short_of_memory_leaves_the_coldest_experts_to_the_cpu() -> None:
    doc = copy.deepcopy(PRESETS["gpu+cpu"])
    doc["device"][0]["memory_gib"] = 20 + 20 * SHAPE.weight_bytes / 2**30  # room for 20 of 32 experts
    cluster = parse_cluster(doc, "c")
    stats = zipf_stats(32, 4, 2000, 1.2, seed=0)
    plan = make_plan(stats, cluster, SHAPE, replicas=0)
    gpu, cpu = plan.placed.layers[0].placement
    tokens = stats.layers[0].tokens
    assert len(gpu) == 20 and len(cpu) == 12
    coldest = np.sort(tokens)[:12].sum()  # the least the CPU can be given
    assert tokens[list(cpu)].sum() <= 1.05 * coldest  # the GPU keeps the hot ones (co-activation may trade a few)
    assert plan.placed.step_time_s < plan.eplb.step_time_s / 2


def test_a_layer_that_cannot_fit_is_named() -> None:
    cluster = parse_cluster(gpus(2, memory_gib=0.1), "c")  # 3 experts of 17.3 MB per device and layer
    stats = ExpertStats({1: LayerStats(np.ones(4)), 7: LayerStats(np.ones(16))})
    with pytest.raises(MocompileError, match=r"^layer 7: its 16 experts of 0.0161 GiB do not fit: the devices hold 6 "):
        make_plan(stats, cluster, SHAPE)


LOADS = ["uniform", "dirichlet", "zipf0.8", "zipf1.2", "zipf1.6"]


def _load(kind: str, experts: int, seed: int) -> ExpertStats:
    rng = np.random.default_rng(seed)
    if kind.startswith("zipf"):
        return zipf_stats(experts, 4, 1500, float(kind[4:]), seed=seed, n_group=4, topk_group=2)
    tokens = rng.uniform(10, 1000, experts) if kind == "uniform" else rng.dirichlet(np.full(experts, 0.3)) * 6000
    return ExpertStats({0: LayerStats(np.round(tokens))}, {"n_group": 4})


def never_worse_than_eplb(setup: str, seeds: range) -> None:
    cluster = parse_cluster(gpus(4, tflops=[989, 989, 400, 200], nodes=2), "c") if setup == "hetero" else preset(setup)
    worse = []
    for seed in seeds:
        for kind in LOADS:
            for replicas in (0, len(cluster.devices)):
                plan = make_plan(_load(kind, 32, seed), cluster, SHAPE, replicas=replicas, max_rounds=40)
                assert plan.eplb.fits
                if plan.placed.step_time_s > plan.eplb.step_time_s * (1 + 1e-9):
                    worse.append((kind, seed, replicas, plan.placed.step_time_s, plan.eplb.step_time_s))
                assert plan.placed.step_time_s <= plan.round_robin.step_time_s * (1 + 1e-9)
    assert not worse


@pytest.mark.parametrize("setup", ["1node-8gpu", "2node-4gpu", "gpu+cpu", "hetero"])
def test_never_worse_than_eplb_over_random_and_zipf_loads(setup: str) -> None:
    never_worse_than_eplb(setup, range(2))


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["1node-8gpu", "2node-4gpu", "gpu+cpu", "gpu+fpga", "hetero"])
def test_never_worse_than_eplb_over_more_loads(setup: str) -> None:
    never_worse_than_eplb(setup, range(2, 12))


def test_json_shape() -> None:
    plan = make_plan(zipf_stats(16, 2, 300, 1.0, layers=2), preset("2node-4gpu"), SHAPE, max_rounds=20)
    doc = plan.to_json()
    assert set(doc) == {"devices", "imbalance", "step_time_s", "baselines"}
    assert set(doc["baselines"]) == {"round_robin", "eplb"}
    for b in doc["baselines"].values():
        assert set(b) == {"imbalance", "step_time_s"} and all(isinstance(v, float) for v in b.values())
    shares: dict[tuple[int, int], float] = {}
    for row in doc["devices"]:
        assert set(row) == {"name", "experts", "memory_bytes", "tokens", "time_s"}
        assert isinstance(row["memory_bytes"], int) and isinstance(row["tokens"], float)
        for x in row["experts"]:
            assert set(x) == {"layer", "expert", "share"}
            shares[x["layer"], x["expert"]] = shares.get((x["layer"], x["expert"]), 0) + x["share"]
    assert len(shares) == 32 and all(abs(s - 1) < 1e-9 for s in shares.values())
    per_layer = [[c.tokens for c in r.costs] for r in plan.placed.layers.values()]
    assert doc["imbalance"] == pytest.approx(np.mean([max(t) / np.mean(t) for t in per_layer]))
