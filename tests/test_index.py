"""deepfeat.index: kinds agree with exact search, ids, save/load, append, input checks, QE/DBA.

Data are small seeded mixtures of Gaussians on the unit sphere (clusters, as image
descriptors have), so every number here is reproducible. FAISS runs on one thread in
this module: results of a multi-threaded HNSW build depend on scheduling, and on a
shared 2-core machine two OpenMP threads can be slower than one.
"""

from __future__ import annotations

import json
import math

import faiss
import numpy as np
import pytest

from deepfeat.errors import StoreError, UsageError
from deepfeat.index import (
    FLAT_MAX_N,
    INDEX_KINDS,
    UNCOMPRESSED_MAX_N,
    Index,
    alpha_query_expansion,
    average_query_expansion,
    brute_force_search,
    check_vectors,
    choose_kind,
    database_side_augmentation,
    dba_index,
    default_params,
    estimate_memory,
    get_kind,
    list_kinds,
    omp_threads,
    plan_index,
    recall_at_k,
    search_with_expansion,
)

N, DIM, NQ, K = 2000, 32, 50, 10

#: every kind a registry entry builds (``auto`` only picks one of them), parametrised from the
#: registry so that a new kind is tested the day it is added
CONCRETE_KINDS = [k for k, spec in INDEX_KINDS.items() if spec.factory is not None]
#: the kinds that keep the raw vectors (results as good as the exact search's, or nearly)
UNCOMPRESSED_KINDS = [k for k in CONCRETE_KINDS if k != "ivfpq"]


@pytest.fixture(autouse=True)
def one_faiss_thread():
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(previous)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int = DIM, clusters: int = 40, seed: int = 0, spread: float = 0.6) -> np.ndarray:
    """n unit vectors around `clusters` random centres; cosine to the centre ~ 1/sqrt(1 + spread^2)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((clusters, d)))
    x = centres[rng.integers(0, clusters, n)] + spread / math.sqrt(d) * rng.standard_normal((n, d))
    return np.ascontiguousarray(unit(x))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    # queries are fresh draws from the same mixture (same centres: same seed), not database rows
    both = clustered(N + NQ)
    return np.ascontiguousarray(both[:N]), np.ascontiguousarray(both[N:])


@pytest.fixture(scope="module")
def truth(data) -> tuple[np.ndarray, np.ndarray]:
    xb, xq = data
    return brute_force_search(xq, xb, K)


def reference_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Straightforward exact k-NN in float64 with a full sort (the reference for brute_force_search)."""
    q, b = xq.astype(np.float64), xb.astype(np.float64)
    if metric == "ip":
        score = q @ b.T
    else:
        score = -(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    order = np.argsort(-score, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(score, order, axis=1)
    return (best if metric == "ip" else -best), order


# ---------------------------------------------------------------- registry, auto, memory


def test_registry_lists_kinds_and_names_valid_ones_on_error():
    assert list_kinds() == ["auto", "flat", "ivf", "ivfpq", "hnsw"]
    assert set(INDEX_KINDS) == set(list_kinds())
    assert get_kind("hnsw").search_params == ("efSearch",)
    with pytest.raises(UsageError) as e:
        get_kind("ivfqp")
    assert "auto, flat, ivf, ivfpq, hnsw" in str(e.value) and "ivfpq" in str(e.value).split("Did you mean")[1]
    with pytest.raises(UsageError, match="valid kinds"):
        Index.build(clustered(100), kind="annoy")


def test_auto_thresholds():
    assert choose_kind(1, 128) == "flat"
    assert choose_kind(FLAT_MAX_N - 1, 128) == "flat"
    assert choose_kind(FLAT_MAX_N, 128) == "hnsw"
    assert choose_kind(UNCOMPRESSED_MAX_N - 1, 128) == "hnsw"
    assert choose_kind(UNCOMPRESSED_MAX_N, 128) == "ivfpq"
    # 1M x 2048 float32 is 8 GiB of raw vectors: over the 4 GiB budget, so compressed
    assert choose_kind(1_000_000, 2048) == "ivfpq"
    assert choose_kind(500_000, 2048) == "hnsw"  # 500k x 2048 x 4 bytes = 3.8 GiB
    plan = plan_index(1_000_000, 128)
    assert plan.kind == "hnsw" and plan.requested == "auto"
    assert plan.memory_bytes == estimate_memory("hnsw", 1_000_000, 128)
    assert "auto -> hnsw" in str(plan) and "expected memory" in str(plan)


def test_default_params_as_functions_of_n():
    p = default_params("ivfpq", 1_000_000, 128)
    assert p == {"nlist": 1024, "nprobe": 64, "M": 32, "nbits": 8, "train_size": 65536}
    assert default_params("ivf", 2000, 32)["nprobe"] == 8  # at least 8 lists (all of them if fewer)
    assert default_params("ivf", 10_000_000, 128)["nlist"] == 4096
    # few vectors: at most n/39 lists (39 training points per centroid), fewer PQ bits
    small = default_params("ivfpq", 2000, 32)
    assert small["nlist"] <= 2000 // 39 and small["nbits"] < 8 and 2000 >= 39 * 2 ** small["nbits"]
    assert default_params("ivfpq", 1000, 96)["M"] == 24  # largest divisor of 96 that is <= 96/4
    assert default_params("hnsw", 50_000, 128)["efSearch"] == 64
    assert default_params("hnsw", 100_000, 128)["efSearch"] == 64
    assert default_params("hnsw", 1_000_000, 128)["efSearch"] == 128
    assert default_params("hnsw", 5_000_000, 128)["efSearch"] == 256
    assert default_params("auto", 10, 8) == {}  # flat


@pytest.mark.parametrize("kind", CONCRETE_KINDS)
def test_memory_estimate_matches_the_serialised_index(kind):
    xb = clustered(5000, seed=3)
    index = Index.build(xb, kind=kind)
    actual = faiss.serialize_index(index.faiss_index).nbytes
    estimate = estimate_memory(kind, 5000, DIM, **index.params)
    assert estimate == index.meta["memory_bytes"]
    assert abs(estimate - actual) / actual < 0.05, (estimate, actual)


def test_ivfpq_l2_estimate_counts_precomputed_tables():
    p = default_params("ivfpq", 1_000_000, 128)
    extra = 4 * p["nlist"] * p["M"] * 2 ** p["nbits"]
    assert estimate_memory("ivfpq", 1_000_000, 128, "l2") - estimate_memory("ivfpq", 1_000_000, 128, "ip") == extra


# ---------------------------------------------------------------- agreement with exact search


def test_brute_force_matches_a_full_sort_with_many_blocks():
    xb, xq = clustered(700, seed=5), clustered(33, seed=6)
    for metric in ("ip", "l2"):
        # block_bytes this small forces ~20 database blocks and the running top-k merge
        D, I = brute_force_search(xq, xb, 7, metric, block_bytes=33 * 4 * 37)
        Dr, Ir = reference_knn(xq, xb, 7, metric)
        np.testing.assert_array_equal(I, Ir)
        np.testing.assert_allclose(D, Dr, atol=1e-5)
        assert D.dtype == np.float32 and I.dtype == np.int64


def test_brute_force_pads_when_k_exceeds_n_and_breaks_ties_by_row():
    xb = unit([[1, 0], [1, 0], [0, 1]])
    D, I = brute_force_search(unit([[1, 0]]), xb, 5)
    assert I.tolist() == [[0, 1, 2, -1, -1]]
    assert D[0, 3] == -np.inf and np.isclose(D[0, 2], 0.0)
    D, I = brute_force_search(unit([[1, 0]]), xb, 4, "l2")
    assert I.tolist() == [[0, 1, 2, -1]] and D[0, 3] == np.inf and np.isclose(D[0, 2], 2.0)


def test_flat_is_exact(data, truth):
    xb, xq = data
    _, It = truth
    for metric in ("ip", "l2"):
        index = Index.build(xb, kind="flat", metric=metric)
        D, I = index.search(xq, K)
        Dm, Im = brute_force_search(xq, xb, K, metric)
        assert recall_at_k(I, Im) == 1.0
        np.testing.assert_allclose(D, Dm, atol=1e-5)
        assert index.exact
    np.testing.assert_array_equal(Index.build(xb, kind="flat").search(xq, K)[1], It)


def test_ivf_with_all_lists_probed_is_exact(data, truth):
    xb, xq = data
    index = Index.build(xb, kind="ivf")
    nlist = index.params["nlist"]
    assert 1 < nlist <= N // 39
    index.nprobe = nlist
    assert index.exact
    D, I = index.search(xq, K)
    assert recall_at_k(I, truth[1]) == 1.0
    np.testing.assert_allclose(D, truth[0], atol=1e-5)
    # with the default nprobe it scans a fraction of the lists and is no longer exact by construction
    index.nprobe = 1
    assert not index.exact and recall_at_k(index.search(xq, K)[1], truth[1]) < 1.0


def test_hnsw_recall(data, truth):
    xb, xq = data
    index = Index.build(xb, kind="hnsw")
    # 2000 points, efSearch=64 candidates per query on a 32-neighbour graph: the search sees a large
    # part of the database, so recall is ~1.0 (measured 1.0 on this seed); 0.95 leaves room for other
    # FAISS versions while a wrong metric or id mapping gives ~K/N = 0.005
    assert recall_at_k(index.search(xq, K)[1], truth[1]) >= 0.95
    index.efSearch = 10
    assert index.efSearch == 10 and index.meta["params"]["efSearch"] == 10


def test_ivfpq_recall(data, truth):
    xb, xq = data
    index = Index.build(xb, kind="ivfpq")
    index.nprobe = index.params["nlist"]  # isolate the quantisation error
    M, nbits = index.params["M"], index.params["nbits"]
    assert (M, nbits) == (8, 5)  # 4 dims per sub-quantizer, 32 centroids each: 5 bytes for 128 bytes of floats
    rec = recall_at_k(index.search(xq, K)[1], truth[1])
    # a 25x-compressed code ranks coarsely: measured 0.55 on this seed. 0.4 is a floor that a broken
    # pipeline (wrong metric, ids, residual encoding) cannot reach (chance is K/N = 0.005)
    assert rec >= 0.4, rec
    # a fine code (1 dim per sub-quantizer, 256 levels) is nearly exact: checks the plumbing, not PQ
    fine = Index.build(xb, kind="ivfpq", M=DIM, nbits=8)
    fine.nprobe = fine.params["nlist"]
    assert recall_at_k(fine.search(xq, K)[1], truth[1]) >= 0.95


def test_auto_picks_flat_for_small_data(data):
    index = Index.build(data[0])
    assert index.kind == "flat" and index.meta["requested_kind"] == "auto"


# ---------------------------------------------------------------- ids, save/load, append


@pytest.mark.parametrize("kind", UNCOMPRESSED_KINDS)
def test_ids_map_results_to_store_rows(data, truth, kind):
    xb, xq = data
    rng = np.random.default_rng(7)
    ids = rng.choice(10**12, N, replace=False)
    index = Index.build(xb, kind=kind, ids=ids)
    if kind == "ivf":
        index.nprobe = index.params["nlist"]
    _, I = index.search(xq, K)
    assert set(np.unique(I)) <= set(ids)
    # map the exact result rows to their ids: the index must return the same ids
    assert recall_at_k(I, ids[truth[1]]) >= (1.0 if kind != "hnsw" else 0.95)
    assert sorted(index.ids().tolist()) == sorted(ids.tolist())
    assert index.meta["next_id"] == int(ids.max()) + 1


@pytest.mark.parametrize("kind", CONCRETE_KINDS)
def test_save_load_round_trip(tmp_path, data, kind):
    xb, xq = data
    source = {"store": "feats", "model": "efficientnet_lite0", "count": N, "dims": [DIM]}
    index = Index.build(xb, kind=kind, source_meta=source, seed=3)
    if kind in ("ivf", "ivfpq"):
        index.nprobe = 5  # a changed search parameter must survive the round trip
    meta_path = index.save(tmp_path / "idx")
    assert meta_path == tmp_path / "idx" / "index.json" and (tmp_path / "idx" / "index.faiss").is_file()
    loaded = Index.load(tmp_path / "idx")
    assert loaded.meta == index.meta
    on_disk = json.loads(meta_path.read_text())
    for key in ("kind", "metric", "d", "ntotal", "params", "build_seconds", "deepfeat_version", "source_meta"):
        assert key in on_disk
    assert on_disk["ntotal"] == N and on_disk["d"] == DIM and on_disk["source_meta"] == source
    D0, I0 = index.search(xq, K)
    D1, I1 = loaded.search(xq, K)
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)
    if kind in ("ivf", "ivfpq"):
        assert loaded.nprobe == 5
    # the store check: same meta passes, a changed store is named
    loaded.verify_source(dict(source))
    with pytest.raises(StoreError, match="count: index built from 2000, store has 2001"):
        loaded.verify_source({**source, "count": N + 1})


def test_save_as_named_file_pair_and_load_by_either_name(tmp_path, data):
    index = Index.build(data[0][:300], kind="flat")
    index.save(tmp_path / "sub" / "mine.faiss")
    assert (tmp_path / "sub" / "mine.json").is_file()
    for p in ("mine.faiss", "mine.json"):
        assert Index.load(tmp_path / "sub" / p).ntotal == 300


def test_load_refuses_missing_truncated_or_mismatched_files(tmp_path, data):
    with pytest.raises(StoreError, match="no index meta"):
        Index.load(tmp_path / "nothing")
    index = Index.build(data[0][:300], kind="flat")
    index.save(tmp_path / "a")
    faiss_file, meta_file = tmp_path / "a" / "index.faiss", tmp_path / "a" / "index.json"
    blob = faiss_file.read_bytes()
    faiss_file.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(StoreError, match="truncated or replaced"):
        Index.load(tmp_path / "a")
    faiss_file.write_bytes(blob)
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "d": DIM + 1}))
    with pytest.raises(StoreError, match="index.json was edited after deepfeat wrote it"):
        Index.load(tmp_path / "a")
    meta.pop("meta_sha256")  # as an index saved before metas recorded their own sha256: the fields are checked
    meta_file.write_text(json.dumps({**meta, "d": DIM + 1}))
    with pytest.raises(StoreError, match="does not match its meta"):
        Index.load(tmp_path / "a")
    meta_file.write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(StoreError, match="not a deepfeat index"):
        Index.load(tmp_path / "a")
    faiss_file.unlink()
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="missing"):
        Index.load(tmp_path / "a")


def test_verify_source_needs_recorded_meta(data):
    with pytest.raises(StoreError, match="without source meta"):
        Index.build(data[0][:100], kind="flat").verify_source({"count": 100})
    with pytest.raises(UsageError, match="JSON"):
        Index.build(data[0][:100], kind="flat", source_meta={"bad": object()})


@pytest.mark.parametrize("kind", UNCOMPRESSED_KINDS)
def test_append_equals_building_on_everything(data, truth, kind):
    xb, xq = data
    half = N // 2
    index = Index.build(np.ascontiguousarray(xb[:half]), kind=kind)
    index.add(np.ascontiguousarray(xb[half:]))  # default ids continue at `half`
    assert index.ntotal == N and index.meta["ntotal"] == N and index.meta["next_id"] == N
    if kind == "ivf":
        index.nprobe = index.params["nlist"]
    D, I = index.search(xq, K)
    assert recall_at_k(I, truth[1]) >= (1.0 if kind != "hnsw" else 0.95)
    if kind != "hnsw":
        np.testing.assert_allclose(D, truth[0], atol=1e-5)
    with pytest.raises(UsageError, match="already in the index"):
        index.add(np.ascontiguousarray(xb[:3]), ids=[5, N + 1, N + 2])
    index.add(np.ascontiguousarray(xb[:2]), ids=[N + 10, N + 11])
    assert index.meta["next_id"] == N + 12
    assert index.meta["memory_bytes"] == estimate_memory(kind, N + 2, DIM, **index.params)


# ---------------------------------------------------------------- bad inputs


def test_input_checks_refuse_with_actionable_messages(data):
    xb = data[0]
    index = Index.build(xb[:200].copy(), kind="flat")
    # float64 is refused, not converted: the boundary is float32, and a silent copy of a big
    # memory-mapped store would double its memory
    with pytest.raises(UsageError, match="float32.*ascontiguousarray"):
        index.search(xb[:3].astype(np.float64), K)
    with pytest.raises(UsageError, match="float32"):
        Index.build(xb.astype(np.float64))
    with pytest.raises(UsageError, match="float32"):
        index.search(np.ones((2, DIM), dtype=np.int64), K)
    with pytest.raises(UsageError, match="has 31 dimensions, expected 32"):
        index.search(np.ascontiguousarray(xb[:3, :31]), K)
    # non-contiguous: a transposed D x N view (the classic layout mix-up) and a strided slice
    with pytest.raises(UsageError, match="C-contiguous"):
        index.search(np.ascontiguousarray(xb[:3].T).T, K)
    with pytest.raises(UsageError, match="C-contiguous"):
        index.search(xb[:6:2], K)
    bad = xb[:10].copy()
    bad[7, 3] = np.nan
    with pytest.raises(UsageError, match="row 7 contains NaN"):
        index.search(bad, K)
    bad[7, 3] = np.inf
    with pytest.raises(UsageError, match="row 7"):
        Index.build(bad)
    with pytest.raises(UsageError, match=r"2-D .*\[None, :\]"):
        index.search(xb[0], K)
    with pytest.raises(UsageError, match="numpy array"):
        index.search(xb[:2].tolist(), K)
    with pytest.raises(UsageError, match="empty"):
        Index.build(np.zeros((0, DIM), np.float32))
    for k in (0, -1, 2.5, True):
        with pytest.raises(UsageError, match="k must be a positive integer"):
            index.search(xb[:2].copy(), k)
    assert check_vectors(xb[:2].copy(), "xq", DIM).shape == (2, DIM)


def test_parameter_and_id_checks(data):
    xb = np.ascontiguousarray(data[0][:500])
    with pytest.raises(UsageError, match="ids must be unique; 3"):
        Index.build(xb[:4].copy(), ids=[1, 3, 3, 4])
    with pytest.raises(UsageError, match="one per row"):
        Index.build(xb[:4].copy(), ids=[1, 2])
    with pytest.raises(UsageError, match=">= 0"):
        Index.build(xb[:2].copy(), ids=[-1, 2])
    with pytest.raises(UsageError, match="integers"):
        Index.build(xb[:2].copy(), ids=[0.5, 2.0])
    with pytest.raises(UsageError, match="valid metrics: ip, l2"):
        Index.build(xb, metric="cosine")
    with pytest.raises(UsageError, match="no parameter nprobe; its parameters: M, efConstruction, efSearch"):
        Index.build(xb, kind="hnsw", nprobe=4)
    with pytest.raises(UsageError, match="no parameter nlist; its parameters: none"):
        Index.build(xb, kind="flat", nlist=4)
    with pytest.raises(UsageError, match="nprobe .* cannot exceed nlist"):
        Index.build(xb, kind="ivf", nlist=8, nprobe=9)
    with pytest.raises(UsageError, match="must divide d"):
        Index.build(xb, kind="ivfpq", M=5)
    with pytest.raises(UsageError, match="cannot train nlist=512"):
        Index.build(xb, kind="ivf", nlist=512, train_size=100)
    with pytest.raises(UsageError, match="positive integer"):
        Index.build(xb, kind="ivf", nlist=0)
    index = Index.build(xb, kind="flat")
    with pytest.raises(UsageError, match="nprobe does not apply to a 'flat' index"):
        index.nprobe = 3
    with pytest.raises(UsageError, match="efSearch does not apply"):
        _ = index.efSearch
    with pytest.raises(UsageError, match="threads"):
        Index.build(xb, threads=0)


def test_threads_argument_is_applied_and_restored(data):
    faiss.omp_set_num_threads(1)
    with omp_threads(2):
        assert faiss.omp_get_max_threads() == 2
    assert faiss.omp_get_max_threads() == 1
    index = Index.build(np.ascontiguousarray(data[0][:300]), kind="hnsw", threads=2)
    assert index.threads == 2 and faiss.omp_get_max_threads() == 1
    index.search(data[1][:2].copy(), 3)
    assert faiss.omp_get_max_threads() == 1


# ---------------------------------------------------------------- query expansion and DBA


def expand_reference(x, xb, nbr_lists, alpha):
    """normalise(x_i + sum_j w_ij xb[j]) with w = max(cos, 0)^alpha, one vector at a time in float64."""
    out = []
    for q, nbrs in zip(x.astype(np.float64), nbr_lists):
        acc = q.copy()
        for j in nbrs:
            v = xb[j].astype(np.float64)
            acc += (max(float(q @ v), 0.0) ** alpha if alpha else 1.0) * v
        out.append(acc / np.linalg.norm(acc))
    return np.array(out)


def angle(v) -> float:
    return math.degrees(math.atan2(v[1], v[0]))


def test_qe_by_hand_on_2d_vectors():
    q = unit([[1, 0]])
    # one neighbour at 90 degrees: AQE gives the bisector; alpha-QE gives it weight cos(90)^2 = 0
    xb = unit([[0, 1]])
    np.testing.assert_allclose(average_query_expansion(q, xb, np.array([[0]]), 1), [[0.70710678, 0.70710678]])
    np.testing.assert_allclose(alpha_query_expansion(q, xb, np.array([[0]]), None, 1, 2.0), [[1.0, 0.0]])
    # a neighbour at 120 degrees (cosine -0.5) is anti-correlated: weight 0 for any alpha > 0, 1 for AQE
    xb = unit([[-0.5, math.sqrt(3) / 2]])
    for alpha in (1.0, 2.0):
        np.testing.assert_allclose(alpha_query_expansion(q, xb, np.array([[0]]), None, 1, alpha), [[1.0, 0.0]])
    np.testing.assert_allclose(average_query_expansion(q, xb, np.array([[0]]), 1), unit([[0.5, math.sqrt(3) / 2]]))
    # neighbour (0.6, 0.8), cosine 0.6: alpha=1 gives q + 0.6 v = (1.36, 0.48) / sqrt(2.08)
    xb = unit([[0.6, 0.8]])
    np.testing.assert_allclose(
        alpha_query_expansion(q, xb, np.array([[0]]), None, 1, 1.0), [[1.36 / math.sqrt(2.08), 0.48 / math.sqrt(2.08)]]
    )


def test_qe_moves_a_query_toward_its_cluster():
    degrees = [80, 85, 90, 95, 0, -5, 5]  # a cluster around 87.5 degrees and one around 0
    xb = unit([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in degrees])
    q = unit([[math.cos(math.radians(60)), math.sin(math.radians(60))]])
    _, I = brute_force_search(q, xb, 4)
    assert I.tolist() == [[0, 1, 2, 3]]  # the four cluster members, nearest first
    for alpha in (0.0, 3.0):
        q2 = alpha_query_expansion(q, xb, I, None, 4, alpha)
        np.testing.assert_allclose(q2, expand_reference(q, xb, I, alpha), atol=1e-6)
        assert 60 < angle(q2[0]) < 87.5  # pulled from 60 degrees toward the cluster
    # AQE = direction of the sum of the unit vectors at 60, 80, 85, 90 and 95 degrees:
    # (0.5 + 0.1736 + 0.0872 + 0 - 0.0872, 0.8660 + 0.9848 + 0.9962 + 1 + 0.9962) = (0.6736, 4.8432): 82.08 degrees
    assert abs(angle(average_query_expansion(q, xb, I, 4)[0]) - 82.08) < 0.01
    # alpha-QE weighs the closer members more, so it moves the query less than AQE here
    assert angle(alpha_query_expansion(q, xb, I, None, 4, 3.0)[0]) < angle(average_query_expansion(q, xb, I, 4)[0])


def test_alpha_qe_against_reference_and_alpha_zero_is_aqe(data):
    xb, xq = data
    D, I = brute_force_search(xq, xb, 5)
    aqe = average_query_expansion(xq, xb, I, 5)
    np.testing.assert_allclose(aqe, expand_reference(xq, xb, I, 0.0), atol=1e-6)
    np.testing.assert_array_equal(alpha_query_expansion(xq, xb, I, None, 5, 0.0), aqe)
    np.testing.assert_array_equal(alpha_query_expansion(xq, xb, I, D, 5, 0.0), aqe)
    a3 = alpha_query_expansion(xq, xb, I, None, 5, 3.0)
    np.testing.assert_allclose(a3, expand_reference(xq, xb, I, 3.0), atol=1e-6)
    np.testing.assert_allclose(alpha_query_expansion(xq, xb, I, D, 5, 3.0), a3, atol=1e-6)  # exact D = recomputed
    np.testing.assert_allclose(np.linalg.norm(a3, axis=1), 1.0, atol=1e-6)
    assert a3.dtype == np.float32 and a3.flags.c_contiguous
    # only the first n columns are used; -1 (no result) is skipped
    I_pad = I.copy()
    I_pad[:, 3:] = -1
    np.testing.assert_allclose(
        average_query_expansion(xq, xb, I_pad, 5), average_query_expansion(xq, xb, I[:, :3], 3), atol=1e-7
    )
    np.testing.assert_allclose(average_query_expansion(xq, xb, I, 0), xq, atol=1e-6)
    with pytest.raises(UsageError, match="row number 2000 but xb has 2000 rows"):
        average_query_expansion(xq, xb, np.full((NQ, 2), N), 2)
    with pytest.raises(UsageError, match="needs at least 6"):
        average_query_expansion(xq, xb, I, 6)
    with pytest.raises(UsageError, match="alpha"):
        alpha_query_expansion(xq, xb, I, None, 2, -1.0)


def test_dba_by_hand_and_self_is_not_counted_twice():
    xb = unit([[1, 0], [0.6, 0.8], [0, 1]])
    out = database_side_augmentation(xb, 1)
    a, b = np.array([1.6, 0.8]), np.array([0.6, 1.8])
    np.testing.assert_allclose(out, [a / np.linalg.norm(a), b / np.linalg.norm(b), b / np.linalg.norm(b)], atol=1e-6)
    # duplicates: a row's identical twin is a neighbour, the row itself is not
    xb = unit([[1, 0], [1, 0], [0, 1]])
    np.testing.assert_allclose(database_side_augmentation(xb, 1)[:2], [[1, 0], [1, 0]], atol=1e-6)
    # n larger than the database: every other row is used
    np.testing.assert_allclose(database_side_augmentation(unit([[1, 0], [0, 1]]), 5), unit([[1, 1], [1, 1]]))


def test_dba_against_reference_and_neighbour_sources_agree(data):
    xb = np.ascontiguousarray(data[0][:400])
    _, I = brute_force_search(xb, xb, 4)
    others = [[j for j in row if j != i][:3] for i, row in enumerate(I)]
    for alpha in (None, 3.0):
        ref = expand_reference(xb, xb, others, alpha or 0.0)
        np.testing.assert_allclose(database_side_augmentation(xb, 3, alpha), ref, atol=1e-6)
        np.testing.assert_allclose(database_side_augmentation(xb, 3, alpha, (None, I)), ref, atol=1e-6)
        np.testing.assert_allclose(database_side_augmentation(xb, 3, alpha, I), ref, atol=1e-6)
        index = Index.build(xb, kind="flat")
        np.testing.assert_allclose(database_side_augmentation(xb, 3, alpha, index), ref, atol=1e-6)
    with pytest.raises(UsageError, match="needs at least 3 neighbours"):
        database_side_augmentation(xb, 3, None, I[:, :2])


def test_search_with_expansion_follows_dba_then_qe(data):
    xb, xq = data
    index = Index.build(xb, kind="flat")
    # nothing to expand: a plain search
    for got, want in zip(search_with_expansion(index, xq, xb, K), index.search(xq, K)):
        np.testing.assert_array_equal(got, want)
    # QE only: first search for the top 3, AQE over the database, second search
    _, I0 = reference_knn(xq, xb, 3)
    _, want = reference_knn(expand_reference(xq, xb, I0, 0.0).astype(np.float32), xb, K)
    assert recall_at_k(search_with_expansion(index, xq, xb, K, qe=3)[1], want) == 1.0
    # DBA then alpha-QE with the same alpha, the queries expanded over the augmented vectors
    _, Ib = reference_knn(xb, xb, 3)
    xb_aug = expand_reference(xb, xb, [[j for j in row if j != i][:2] for i, row in enumerate(Ib)], 3.0)
    xb_aug = np.ascontiguousarray(xb_aug, dtype=np.float32)
    _, I0 = reference_knn(xq, xb_aug, 4)
    _, want = reference_knn(expand_reference(xq, xb_aug, I0, 3.0).astype(np.float32), xb_aug, K)
    _, I = search_with_expansion(index, xq, xb, K, qe=4, alpha=3.0, dba=2)
    assert recall_at_k(I, want) >= 0.99  # float32 vs float64 reference: allow one near-tie swap
    # expansion changes the ranking (otherwise this test would prove nothing)
    assert recall_at_k(I, index.search(xq, K)[1]) < 0.95


def test_dba_index_keeps_kind_and_reuses_the_trained_quantizer(data):
    xb, xq = data
    index = Index.build(xb, kind="ivf", source_meta={"store": "s"})
    augmented, xb_aug = dba_index(index, xb, 2, alpha=3.0)
    assert augmented.kind == "ivf" and augmented.params == index.params and augmented.ntotal == N
    assert augmented.meta["augmentation"] == {"method": "dba", "n": 2, "alpha": 3.0}
    assert augmented.meta["train_seconds"] == 0.0 and augmented.meta["source_meta"] == {"store": "s"}
    ivf_a, ivf_b = faiss.extract_index_ivf(index.faiss_index), faiss.extract_index_ivf(augmented.faiss_index)
    size = index.params["nlist"] * DIM
    np.testing.assert_array_equal(
        faiss.rev_swig_ptr(faiss.downcast_index(ivf_a.quantizer).get_xb(), size),
        faiss.rev_swig_ptr(faiss.downcast_index(ivf_b.quantizer).get_xb(), size),
    )
    np.testing.assert_allclose(xb_aug, database_side_augmentation(xb, 2, 3.0, index), atol=1e-7)
    # searching the augmented index returns rows of the augmented database
    augmented.nprobe = augmented.params["nlist"]
    assert recall_at_k(augmented.search(xq, K)[1], brute_force_search(xq, xb_aug, K)[1]) == 1.0
    hnsw = Index.build(xb, kind="hnsw")
    assert dba_index(hnsw, xb, 1)[0].kind == "hnsw"
    with pytest.raises(UsageError, match="holds 2000 vectors but xb has 100"):
        search_with_expansion(index, xq, np.ascontiguousarray(xb[:100]), K, qe=2)


def test_recall_at_k():
    assert recall_at_k(np.array([[1, 2, 3]]), np.array([[3, 2, 9]])) == pytest.approx(2 / 3)
    assert recall_at_k(np.array([[1, -1]]), np.array([[1, 2]]), 2) == 0.5
    with pytest.raises(UsageError):
        recall_at_k(np.array([[1, 2]]), np.array([[1, 2]]), 3)
