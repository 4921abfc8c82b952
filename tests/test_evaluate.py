"""Retrieval metrics and ground truth: hand-computed cases, the real Oxford/Paris gt
files with constructed rankings, and the compute-ap drop-in."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from deepfeat.cli import cmd_compute_ap
from deepfeat.errors import FormatError, UsageError
from deepfeat.evaluate import (
    GroundTruth,
    Query,
    average_precision,
    average_precision_revisited,
    class_folder_gt,
    evaluate_ranks,
    groups_gt,
    load_oxford_gt,
    load_revisited_gt,
    mean_average_precision,
    ns_score,
    parse_gt_spec,
    precision_at_k,
    precision_at_k_revisited,
    rank_by_similarity,
    read_revisited_gnd,
    recall_at_k,
    ukbench_gt,
)

from .conftest import REPO, SHARED_DATA

OXFORD_GT = SHARED_DATA / "oxford5k_gt"
PARIS_GT = SHARED_DATA / "paris6k_gt"
needs_oxford = pytest.mark.skipif(not OXFORD_GT.is_dir(), reason=f"Oxford gt not found at {OXFORD_GT}")
needs_paris = pytest.mark.skipif(not PARIS_GT.is_dir(), reason=f"Paris gt not found at {PARIS_GT}")


# ------------------------------------------------------------ independent references


def ref_compute_ap(pos: set, amb: set, ranked: list) -> float:
    """Line-by-line transliteration of compute_ap.cpp, with its float/double types."""
    f32 = np.float32
    old_recall, old_precision, ap = f32(0.0), f32(1.0), f32(0.0)
    intersect, j = 0, 0
    for item in ranked:
        if item in amb:
            continue
        if item in pos:
            intersect += 1
        recall = f32(intersect) / f32(len(pos))
        precision = f32(intersect / (j + 1.0))
        ap = f32(float(ap) + float(recall - old_recall) * (float(old_precision + precision) / 2.0))
        old_recall, old_precision = recall, precision
        j += 1
    return float(ap)


def ref_ap_float64(pos: set, junk: set, ranked: list) -> float:
    """The same trapezoids in plain double precision: sum over positives of step * mean precision."""
    kept = [x for x in ranked if x not in junk]
    ap, hits, prev = 0.0, 0, 1.0
    for r, x in enumerate(kept, 1):
        if x in pos:
            hits += 1
            ap += (prev + hits / r) / 2 / len(pos)
        prev = hits / r
    return ap


def ref_revisited_map(ranks_nq: np.ndarray, gnd: list[dict], kappas: list[int]):
    """Radenovic's compute_map (ranks are N x Q, as in revisitop), loops kept as written."""
    def compute_ap(ranks, nres):
        ap, recall_step = 0.0, 1.0 / nres
        for j in np.arange(len(ranks)):
            rank = ranks[j]
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        return ap

    mAP, nq, nempty = 0.0, len(gnd), 0
    aps, pr = np.zeros(nq), np.zeros(len(kappas))
    for i in range(nq):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            nempty += 1
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks_nq.shape[0])[np.isin(ranks_nq[:, i], qgnd)]
        junk = np.arange(ranks_nq.shape[0])[np.isin(ranks_nq[:, i], qgndj)]
        k = ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = compute_ap(pos, len(qgnd))
        mAP += ap
        aps[i] = ap
        pos += 1
        for j in range(len(kappas)):
            kq = min(max(pos), kappas[j])
            pr[j] += (pos <= kq).sum() / kq
    return mAP / (nq - nempty), aps, pr / (nq - nempty)


# ------------------------------------------------------------------ AP by hand


def test_ap_hand_computed():
    # positives at ranks 1 and 3 of 3: 1/2*(1+1)/2 + 1/2*(1/2+2/3)/2 = 0.5 + 0.291667
    assert average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2, abs=1e-7)
    assert average_precision(["a", "b", "x"], {"a", "b"}) == 1.0
    # only the last of four ranked: (0 + 1/4) / 2
    assert average_precision(["x", "y", "z", "a"], {"a"}) == pytest.approx(0.125, abs=1e-7)
    # a positive never ranked (truncated list) contributes nothing: 1/2 * (1+1)/2
    assert average_precision(["a", "x"], {"a", "b"}) == 0.5
    assert average_precision(["x", "y"], {"a"}) == 0.0
    assert math.isnan(average_precision(["x", "y"], set()))
    assert average_precision([], {"a"}) == 0.0
    # integer ids and numpy arrays work the same
    assert average_precision(np.array([7, 3, 9]), {7, 9}) == average_precision(["a", "x", "b"], {"a", "b"})


def test_ap_junk_is_skipped():
    base = average_precision(["a", "x", "b"], {"a", "b"})
    for ranked in (["J", "a", "x", "b"], ["a", "J", "x", "K", "b"], ["a", "x", "b", "J", "K"]):
        assert average_precision(ranked, {"a", "b"}, {"J", "K"}) == base
    # junk wins over positive (compute_ap tests junk first) but still counts in the positives
    assert average_precision(["a", "b"], {"a", "b"}, {"b"}) == 0.5
    assert average_precision_revisited(["a", "b"], {"a", "b"}, {"b"}) == 1.0


def test_ties_follow_the_given_order():
    """Metrics see only the order; rank_by_similarity breaks ties by database order."""
    xb = np.array([[1.0, 0], [1.0, 0], [0.5, 0], [1.0, 0]], dtype=np.float32)
    xq = np.array([[1.0, 0]], dtype=np.float32)
    order = rank_by_similarity(xq, xb)
    assert order.tolist() == [[0, 1, 3, 2]]
    # the positive is tied for first but comes third: (1/2*0... ) = (0/2 + 1/3) / 2
    assert average_precision(order[0], {3}) == pytest.approx(1 / 6, abs=1e-7)
    assert average_precision([3, 0, 1, 2], {3}) == 1.0  # the other tie order
    # many ties: the order of Python's (stable) sort on descending score, in blocks of queries
    levels = np.random.default_rng(1).integers(0, 3, size=(300, 1)).astype(np.float32)
    xb = np.hstack([levels, np.zeros_like(levels)])
    xq = np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    expect = [sorted(range(300), key=lambda i: -float(xb[i] @ q)) for q in xq]
    assert rank_by_similarity(xq, xb).tolist() == expect


def test_ap_matches_compute_ap_transliteration_bit_for_bit():
    rng = random.Random(5)
    for _ in range(60):
        npos, njunk, nneg = rng.choice([1, 2, 3, 17, 200]), rng.randrange(0, 40), rng.randrange(0, 2000)
        pos = {f"p{i}" for i in range(npos)}
        junk = {f"j{i}" for i in range(njunk)}
        ranked = [f"p{i}" for i in range(rng.randrange(0, npos + 1))] + sorted(junk) + [f"n{i}" for i in range(nneg)]
        rng.shuffle(ranked)
        assert average_precision(ranked, pos, junk) == ref_compute_ap(pos, junk, ranked)
        assert average_precision(ranked, pos, junk) == pytest.approx(ref_ap_float64(pos, junk, ranked), abs=1e-5)
        assert average_precision_revisited(ranked, pos, junk) == pytest.approx(
            ref_ap_float64(pos, junk, ranked), abs=1e-12)


def test_precision_and_recall_at_k():
    ranked = ["a", "J", "x", "b", "y", "z"]
    pos, junk = {"a", "b", "c"}, {"J"}
    assert [precision_at_k(ranked, pos, k, junk) for k in (1, 2, 3, 5, 10)] == [1.0, 0.5, 2 / 3, 0.4, 0.2]
    assert recall_at_k(ranked, pos, 3, junk) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, pos, 1, junk) == pytest.approx(1 / 3)
    # revisited P@k divides by min(k, rank of the last ranked positive) = 3
    assert precision_at_k_revisited(ranked, pos, 5, junk) == pytest.approx(2 / 3)
    assert precision_at_k_revisited(ranked, pos, 1, junk) == 1.0
    assert precision_at_k_revisited(["x"], pos, 5) == 0.0
    with pytest.raises(UsageError, match="positive integer"):
        precision_at_k(ranked, pos, 0)


# ----------------------------------------------------------------- Oxford / Paris


def _db_from_gt(gt_dir, extra: int = 200, seed: int = 0) -> list[str]:
    names = set()
    for f in os.listdir(gt_dir):
        if not f.endswith("_query.txt"):
            names |= {s.strip() for s in (gt_dir / f).read_text().splitlines() if s.strip()}
    paths = [f"/data/{'oxbuild' if 'oxford' in str(gt_dir) else 'paris'}/{n}.jpg" for n in sorted(names)]
    paths += [f"/data/distractors/extra_{i:05d}.jpg" for i in range(extra)]
    random.Random(seed).shuffle(paths)
    return paths


@needs_oxford
def test_oxford_gt_loads_and_perfect_ranking_scores_one():
    db = _db_from_gt(OXFORD_GT)
    gt = load_oxford_gt(OXFORD_GT, db)
    assert len(gt) == 55 and gt.protocol == "oxford" and not gt.exclude_query
    q = gt.queries[0]
    assert q.name == "all_souls_1" and q.image == "all_souls_000013"
    assert q.path.endswith("/all_souls_000013.jpg") and db[q.index] == q.path
    assert q.bbox == (136.5, 34.1, 648.5, 955.7)
    assert len(q.relevant) == 24 + 54 and len(q.junk) == 33 and q.index in q.relevant
    n = len(db)
    perfect = np.array([sorted(qq.relevant) + sorted(qq.junk)
                        + [i for i in range(n) if i not in qq.relevant and i not in qq.junk] for qq in gt.queries])
    res = evaluate_ranks(perfect, gt)
    assert res.map == 1.0 and res.mp_at_k[1] == 1.0 and res.n_skipped == 0
    # P@10 is below 1 only for queries with fewer than 10 positives (pitt_rivers has 6)
    assert res.mp_at_k[10] == pytest.approx(np.mean([min(len(qq.relevant), 10) / 10 for qq in gt.queries]))
    assert res.mp_at_k[10] < 1.0
    # junk first, then positives: junk is ignored, still perfect
    junk_first = np.array([sorted(qq.junk) + sorted(qq.relevant)
                           + [i for i in range(n) if i not in qq.relevant and i not in qq.junk] for qq in gt.queries])
    assert mean_average_precision(junk_first, gt) == 1.0


@needs_oxford
def test_oxford_constructed_rankings_against_reference():
    db = _db_from_gt(OXFORD_GT)
    gt = load_oxford_gt(OXFORD_GT, db)
    n, rng = len(db), np.random.default_rng(0)
    reversed_rows, shuffled_rows, nojunk_rows = [], [], []
    for q in gt.queries:
        others = [i for i in range(n) if i not in q.relevant and i not in q.junk]
        reversed_rows.append(others + sorted(q.junk) + sorted(q.relevant))
        row = rng.permutation(n)
        shuffled_rows.append(row)
        nojunk_rows.append(np.concatenate([row[~np.isin(row, list(q.junk))], np.full(len(q.junk), -1)]))
    for rows in (reversed_rows, shuffled_rows):
        res = evaluate_ranks(np.array(rows), gt)
        expect = [ref_compute_ap(q.relevant, q.junk, list(r)) for q, r in zip(gt.queries, rows)]
        assert [r.ap for r in res.queries] == expect
        assert res.map == pytest.approx(np.mean(expect), abs=1e-12)
        f64 = [ref_ap_float64(q.relevant, q.junk, list(r)) for q, r in zip(gt.queries, rows)]
        assert res.map == pytest.approx(np.mean(f64), abs=1e-6)
    # the reversed ranking puts the first positive after every negative
    res = evaluate_ranks(np.array(reversed_rows), gt)
    q0 = gt.queries[0]
    assert res.queries[0].first_hit == n - len(q0.relevant) - len(q0.junk) + 1
    assert res.mp_at_k[10] == 0.0
    # removing the junk from a ranking (padding with -1) does not change any AP
    same = evaluate_ranks(np.stack(nojunk_rows), gt)
    assert [r.ap for r in same.queries] == [r.ap for r in evaluate_ranks(np.stack(shuffled_rows), gt).queries]


@needs_oxford
def test_oxford_gt_errors(tmp_path):
    db = _db_from_gt(OXFORD_GT, extra=0)
    with pytest.raises(UsageError, match=r"3 of the \d+ images named .* not in the database .*e\.g\."):
        load_oxford_gt(OXFORD_GT, [p for p in db if not p.endswith(("all_souls_000013.jpg", "all_souls_000091.jpg",
                                                                     "oxford_003410.jpg"))])
    gt_dir = tmp_path / "gt"
    gt_dir.mkdir()
    for f in ("all_souls_1_good.txt", "all_souls_1_ok.txt", "all_souls_1_junk.txt"):
        (gt_dir / f).write_text((OXFORD_GT / f).read_text())
    (gt_dir / "all_souls_1_query.txt").write_text("oxc1_all_souls_000013 136.5 34.1\n")
    with pytest.raises(FormatError, match="all_souls_1_query.txt:1: expected 'IMAGE x1 y1 x2 y2'"):
        load_oxford_gt(gt_dir, db)
    (gt_dir / "all_souls_1_query.txt").write_text((OXFORD_GT / "all_souls_1_query.txt").read_text())
    (gt_dir / "all_souls_1_ok.txt").unlink()
    with pytest.raises(FormatError, match="incomplete ground truth for query all_souls_1"):
        load_oxford_gt(gt_dir, db)
    with pytest.raises(UsageError, match="no \\*_query.txt files"):
        load_oxford_gt(tmp_path, db)


@needs_paris
def test_paris_gt_positives_come_from_ok():
    db = _db_from_gt(PARIS_GT, extra=0)
    gt = parse_gt_spec(f"oxford:{PARIS_GT}", db)[0]
    assert len(gt) == 55
    q = gt.queries[0]
    assert q.name == "defense_1" and q.image == "paris_defense_000605"
    n_ok = sum(1 for s in (PARIS_GT / "defense_1_ok.txt").read_text().splitlines() if s.strip())
    assert len(q.relevant) == n_ok and (PARIS_GT / "defense_1_good.txt").read_text().strip() == ""
    perfect = np.array([sorted(qq.relevant) + [i for i in range(len(db)) if i not in qq.relevant]
                        for qq in gt.queries])
    assert mean_average_precision(perfect, gt) == 1.0


# ------------------------------------------------------------ the compute-ap drop-in


def _run_compute_ap(capsys, prefix, ranked) -> tuple[str, str]:
    sub = argparse.ArgumentParser().add_subparsers()
    cmd_compute_ap.register(sub)
    args = sub.choices["compute-ap"].parse_args([str(prefix), str(ranked)])
    assert args.func(args) == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_compute_ap_cli(tmp_path, capsys):
    (tmp_path / "q_good.txt").write_text("a\n")
    (tmp_path / "q_ok.txt").write_text("b\r\n")  # CRLF lists work too
    (tmp_path / "q_junk.txt").write_text("J\n")
    ranked = tmp_path / "ranked.txt"
    ranked.write_text("a\nJ\nx\nb\ny\n")
    assert _run_compute_ap(capsys, tmp_path / "q", ranked) == ("0.791667\n", "")
    ranked.write_text("a\nb\n")
    assert _run_compute_ap(capsys, tmp_path / "q", ranked)[0] == "1\n"  # cout prints 1.0 as "1"
    ranked.write_text("x.jpg\ny.jpg\n")
    out, err = _run_compute_ap(capsys, tmp_path / "q", ranked)
    assert out == "0\n" and "none of the 2 ranked names is in the ground truth" in err
    (tmp_path / "e_good.txt").write_text("")
    (tmp_path / "e_ok.txt").write_text("")
    (tmp_path / "e_junk.txt").write_text("")
    out, err = _run_compute_ap(capsys, tmp_path / "e", ranked)
    assert out == "-nan\n" and "both empty" in err
    with pytest.raises(UsageError, match="ground-truth file not found: .*nope_good.txt"):
        cmd_compute_ap.run(argparse.Namespace(gt_prefix=str(tmp_path / "nope"), ranked_list=str(ranked)))
    with pytest.raises(UsageError, match="without the suffix, e.g. .*/q$"):
        cmd_compute_ap.run(argparse.Namespace(gt_prefix=str(tmp_path / "q_good.txt"), ranked_list=str(ranked)))
    with pytest.raises(UsageError, match="ranked list not found"):
        cmd_compute_ap.run(argparse.Namespace(gt_prefix=str(tmp_path / "q"), ranked_list=str(tmp_path / "no.txt")))


def test_compute_ap_through_main(tmp_path, capsys, monkeypatch):
    """Exit codes and error lines of `deepfeat compute-ap`, whether or not it is registered yet."""
    from deepfeat import cli

    monkeypatch.setattr(cli, "COMMAND_MODULES", tuple(dict.fromkeys((*cli.COMMAND_MODULES, "cmd_compute_ap"))))
    for kind, text in (("good", "a\n"), ("ok", ""), ("junk", "")):
        (tmp_path / f"q_{kind}.txt").write_text(text)
    (tmp_path / "r.txt").write_text("x\na\n")
    assert cli.main(["compute-ap", str(tmp_path / "q"), str(tmp_path / "r.txt")]) == 0
    assert capsys.readouterr().out == "0.25\n"
    assert cli.main(["compute-ap", str(tmp_path / "nope"), str(tmp_path / "r.txt")]) == 2
    assert "deepfeat compute-ap: error: ground-truth file not found" in capsys.readouterr().err


@needs_oxford
def test_compute_ap_cli_on_oxford_gt(tmp_path, capsys):
    prefix = OXFORD_GT / "all_souls_1"

    def names(kind: str) -> list[str]:
        return [s.strip() for s in Path(f"{prefix}_{kind}.txt").read_text().splitlines() if s.strip()]

    ranked = names("ok")[:10] + [f"neg_{i}" for i in range(30)] + names("junk") + names("good") + names("ok")[10:]
    (tmp_path / "ranked.txt").write_text("\n".join(ranked) + "\n")
    out, _ = _run_compute_ap(capsys, prefix, tmp_path / "ranked.txt")
    expect = ref_compute_ap(set(names("good")) | set(names("ok")), set(names("junk")), ranked)
    assert out == f"{expect:.6g}\n"
    assert out == "0.617963\n"  # what the original compute_ap (g++ -O2, x86-64) prints for this list


# -------------------------------------------------------- folders, groups, UKBench


TINY = ["col/a/x1.jpg", "col/a/x2.jpg", "col/b/y1.jpg", "col/b/y2.jpg", "col/b/y3.jpg", "col/c/z.jpg"]


def test_class_folder_gt_and_self_exclusion():
    gt = class_folder_gt(TINY)
    assert gt.exclude_query and gt.protocol == "folders" and len(gt) == 6
    assert [q.name for q in gt.queries][:2] == ["a/x1.jpg", "a/x2.jpg"]
    assert gt.queries[0].relevant == {1} and gt.queries[2].relevant == {3, 4} and gt.queries[5].relevant == set()
    ranks = np.array([
        [0, 2, 1, 3, 4, 5],  # x1: self removed, x2 at rank 2 -> (0 + 1/2)/2 = 0.25
        [1, 0, 2, 3, 4, 5],  # x2: x1 first -> 1
        [2, 3, 0, 4, 1, 5],  # y1: y2 at 1, y3 at 3 -> 1/2 + 1/2*(1/2 + 2/3)/2
        [3, 2, 4, 0, 1, 5],  # y2: 1
        [4, 0, 1, 5, 2, 3],  # y3: ranks 4 and 5 -> 1/2*(0+1/4)/2 + 1/2*(1/4+2/5)/2
        [5, 0, 1, 2, 3, 4],  # z: alone in its class, skipped
    ])
    res = evaluate_ranks(ranks, gt, ks=(1, 2))
    aps = [0.25, 1.0, 0.5 + 0.25 * (0.5 + 2 / 3), 1.0, 0.0625 + 0.25 * (0.25 + 0.4), float("nan")]
    assert [r.ap for r in res.queries[:5]] == pytest.approx(aps[:5], abs=1e-6) and math.isnan(res.queries[5].ap)
    assert res.n_skipped == 1 and res.map == pytest.approx(np.mean(aps[:5]), abs=1e-6)
    assert res.mp_at_k[1] == pytest.approx(np.mean([0, 1, 1, 1, 0]))
    assert res.mp_at_k[2] == pytest.approx(np.mean([0.5, 0.5, 0.5, 1, 0]))
    # the same rankings from a brute-force search, self excluded at search time
    xb = np.eye(6, dtype=np.float32)
    ranked = rank_by_similarity(xb, xb, exclude_self=True)
    assert ranked.shape == (6, 6) and (ranked[:, -1] == -1).all() and (ranked[:, :-1] != np.arange(6)[:, None]).all()
    res2 = evaluate_ranks(ranked, gt)
    assert res2.queries[0].ap == 1.0  # x1 -> [1, 2, 3, ...]: x2 first by database order
    text = res.table()
    assert "a/x1.jpg" in text and "mAP" in text.splitlines()[-1] and "1 without relevant items skipped" in text
    json.dumps(res.to_dict(), allow_nan=False)
    with pytest.raises(UsageError, match="at least two class folders"):
        class_folder_gt(["a/1.jpg", "a/2.jpg"])


def test_groups_csv(tmp_path):
    csv_path = tmp_path / "groups.csv"
    db = ["/imgs/p1.jpg", "/imgs/p2.jpg", "/imgs/sub,dir/p3.jpg", "/imgs/q1.jpg", "/imgs/q2.jpg", "/imgs/noise.jpg"]
    csv_path.write_text('path,group\np1.jpg,paris\nimgs/p2.jpg,paris\n"sub,dir/p3.jpg",paris\n'
                        "q1,rome\n\n# comment\nq2.jpg,rome\n")
    gt = groups_gt(csv_path, db)
    assert [q.index for q in gt.queries] == [0, 1, 2, 3, 4]
    assert gt.queries[0].relevant == {1, 2} and gt.queries[3].relevant == {4} and gt.exclude_query
    assert parse_gt_spec(f"groups:{csv_path}", db)[0].queries == gt.queries
    keep = groups_gt(csv_path, db, exclude_query=False)
    assert keep.queries[0].relevant == {0, 1, 2}
    ranks = np.array([[0, 1, 5, 2, 3, 4]] * 5)
    # p1: self dropped -> [p2, noise, p3, ...]: 1/2 + 1/2*(1/2+2/3)/2
    assert evaluate_ranks(ranks, gt).queries[0].ap == pytest.approx(0.5 + 0.25 * (0.5 + 2 / 3), abs=1e-6)
    csv_path.write_text("p1.jpg,paris,extra\n")
    with pytest.raises(FormatError, match=r"groups.csv:1: expected 'path,group'"):
        groups_gt(csv_path, db)
    csv_path.write_text("p1.jpg,paris\np1.jpg,rome\n")
    with pytest.raises(FormatError, match="listed in two groups"):
        groups_gt(csv_path, db)
    csv_path.write_text("p1.jpg,paris\nmissing.jpg,paris\n")
    with pytest.raises(UsageError, match="1 of the 2 images named in the groups file .* not in the database"):
        groups_gt(csv_path, db)
    csv_path.write_text("x.jpg,a\n")
    with pytest.raises(UsageError, match="match several database items"):
        groups_gt(csv_path, ["d1/x.jpg", "d2/x.jpg"])
    csv_path.write_text("d2/x.jpg,a\n")
    assert groups_gt(csv_path, ["d1/x.jpg", "d2/x.jpg"]).queries[0].index == 1


def test_ukbench_ns_score():
    db = [f"ukb/ukbench{i:05d}.jpg" for i in range(8)]
    gt = ukbench_gt(db)
    assert not gt.exclude_query and gt.queries[5].relevant == {4, 5, 6, 7} and gt.queries[5].name == "ukbench00005"
    perfect = np.array([[i] + [j for j in range(8) if j // 4 == i // 4 and j != i]
                        + [j for j in range(8) if j // 4 != i // 4] for i in range(8)])
    assert ns_score(perfect, gt) == 4.0 and mean_average_precision(perfect, gt) == 1.0
    worse = perfect.copy()
    worse[:4] = [[i, 4, 5, 6] + [j for j in range(4) if j != i] + [7] for i in range(4)]  # 1 of 4 in the top 4
    assert ns_score(worse, gt) == pytest.approx((4 * 1 + 4 * 4) / 8)
    res = evaluate_ranks(worse, gt)
    assert res.ns_score == pytest.approx(2.5) and res.queries[0].top4_hits == 1 and "N-S 2.500" in res.summary()
    with pytest.raises(UsageError, match="no UKBench number"):
        ukbench_gt(["a/cat.jpg"])
    ukb = SHARED_DATA / "ukbench56"
    if ukb.is_dir():
        real = ukbench_gt(sorted(str(p) for p in ukb.glob("*.jpg")))
        assert len(real) == 56 and all(len(q.relevant) == 4 for q in real.queries)


# ----------------------------------------------------------------- revisited


def _revisited_doc() -> dict:
    # database d0..d7; queries q0 (in the store as an extra image) and q1 (not in the store)
    return {
        "format": "deepfeat-revisited-gnd", "version": 1,
        "imlist": [f"d{i}" for i in range(8)], "qimlist": ["q0", "q1"],
        "gnd": [{"bbx": [1, 2, 30.5, 40], "easy": [0, 3], "hard": [5], "junk": [1]},
                {"bbx": None, "easy": [], "hard": [2, 7], "junk": []}],
    }


def test_revisited_protocols(tmp_path):
    path = tmp_path / "gnd.json"
    path.write_text(json.dumps(_revisited_doc()))
    db = ["q0.jpg"] + [f"db/d{i}.jpg" for i in range(8)]  # the store holds query q0 too, first
    easy = load_revisited_gt(path, db, "easy")
    assert easy.excluded == {0} and easy.queries[0].index == 0 and easy.queries[1].index is None
    assert easy.queries[0].relevant == {1, 4} and easy.queries[0].junk == {2, 6}
    assert easy.queries[0].bbox == (1.0, 2.0, 30.5, 40.0) and easy.queries[1].bbox is None
    gts = parse_gt_spec(f"revisited:{path}", db)
    assert [g.protocol for g in gts] == ["revisited-easy", "revisited-medium", "revisited-hard"]
    medium, hard = gts[1], gts[2]
    assert medium.queries[0].relevant == {1, 4, 6} and medium.queries[0].junk == {2}
    assert hard.queries[0].relevant == {6} and hard.queries[0].junk == {2, 1, 4}
    rng = np.random.default_rng(3)
    ranks = np.stack([rng.permutation(9) for _ in range(2)])
    kappas = [1, 5, 10]
    for g, name in zip(gts, ("easy", "medium", "hard")):
        res = evaluate_ranks(ranks, g, ks=kappas)
        # the reference ranks imlist indices only: drop the store's extra query image, map to imlist order
        ranks_im = np.stack([r[r != 0] - 1 for r in ranks]).T
        pos_keys, junk_keys = {"easy": (["easy"], ["junk", "hard"]), "medium": (["easy", "hard"], ["junk"]),
                               "hard": (["hard"], ["junk", "easy"])}[name]
        gnd = [{"ok": [i for k in pos_keys for i in e[k]], "junk": [i for k in junk_keys for i in e[k]]}
               for e in _revisited_doc()["gnd"]]
        ref_map, ref_aps, ref_pr = ref_revisited_map(ranks_im, gnd, kappas)
        assert res.map == pytest.approx(ref_map, abs=1e-12), name
        assert [q.ap for q in res.queries] == pytest.approx(list(ref_aps), abs=1e-12, nan_ok=True)
        assert [res.mp_at_k[k] for k in kappas] == pytest.approx(list(ref_pr), abs=1e-12)
    assert evaluate_ranks(ranks, gts[0]).n_skipped == 1  # q1 has no easy positives
    with pytest.raises(UsageError, match="unknown revisited protocol 'meduim'.*Did you mean: medium"):
        load_revisited_gt(path, db, "meduim")
    with pytest.raises(UsageError, match=r"1 of the 8 images named in 'imlist'"):
        load_revisited_gt(path, db[:-1], "easy")


def test_revisited_json_is_checked(tmp_path):
    path = tmp_path / "gnd.json"
    for mutate, msg in [
        (lambda d: d.pop("imlist"), "'imlist' is missing"),
        (lambda d: d["gnd"].pop(), "'gnd' has 1 entries for 2 query images"),
        (lambda d: d["gnd"][0].update(easy=[0, 8]), r"indices outside 'imlist' \(0..7\): \[8\]"),
        (lambda d: d["gnd"][1].update(bbx=[1, 2]), r"gnd\[1\]\['bbx'\] must be"),
        (lambda d: d.update(format="other"), "format is 'other'"),
    ]:
        doc = _revisited_doc()
        mutate(doc)
        path.write_text(json.dumps(doc))
        with pytest.raises(FormatError, match=msg):
            read_revisited_gnd(path)
    path.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_revisited_gnd(path)
    pkl = tmp_path / "gnd_roxford5k.pkl"
    pkl.write_bytes(b"x")
    with pytest.raises(FormatError, match="cannot read .*gnd_roxford5k.pkl as a pickle"):
        read_revisited_gnd(pkl)


def _converter():
    spec = importlib.util.spec_from_file_location("convert_revisited_gnd", REPO / "scripts" / "convert_revisited_gnd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


def test_convert_revisited_pickle(tmp_path, capsys):
    conv = _converter()
    doc = _revisited_doc()
    official = {"imlist": doc["imlist"], "qimlist": doc["qimlist"],
                "gnd": [{"bbx": np.array(g["bbx"], dtype=np.float64) if g["bbx"] else None,
                         "easy": np.array(g["easy"], dtype=np.int64), "hard": list(g["hard"]),
                         "junk": np.array(g["junk"], dtype=np.int64)} for g in doc["gnd"]]}
    pkl = tmp_path / "gnd_test.pkl"
    for protocol in (2, 4, 5):
        pkl.write_bytes(pickle.dumps(official, protocol=protocol))
        assert conv.main([str(pkl)]) == 0
        captured = capsys.readouterr()
        assert "warning" in captured.err and "2 queries, 8 database images" in captured.out
        out = read_revisited_gnd(tmp_path / "gnd_test.json")
        assert out["gnd"] == doc["gnd"] and out["imlist"] == doc["imlist"]
    gt = load_revisited_gt(tmp_path / "gnd_test.json", [f"d{i}.jpg" for i in range(8)], "medium")
    assert gt.queries[0].relevant == {0, 3, 5}
    pkl.write_bytes(pickle.dumps({"imlist": _Sneaky()}))
    assert conv.main([str(pkl), "-o", str(tmp_path / "x.json")]) == 1
    assert "refusing to load it" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


class _Shell:
    """A pickle that runs a shell command when loaded with plain pickle.load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _official(doc):
    return {"imlist": doc["imlist"], "qimlist": doc["qimlist"],
            "gnd": [{"bbx": np.array(g["bbx"], dtype=np.float64) if g["bbx"] else None,
                     "easy": np.array(g["easy"], dtype=np.int64), "hard": list(g["hard"]),
                     "junk": np.array(g["junk"], dtype=np.int64)} for g in doc["gnd"]]}


def test_revisited_pickles_are_read_without_running_code(tmp_path):
    from deepfeat.evaluate.gnd_pickle import load_restricted_pickle

    doc = _revisited_doc()
    pkl = tmp_path / "gnd_roxford5k.pkl"
    for protocol in (2, 4, 5):  # the official files are protocol 2 (Python 2); numpy arrays inside
        pkl.write_bytes(pickle.dumps(_official(doc), protocol=protocol))
        data = read_revisited_gnd(pkl)
        assert data["gnd"] == doc["gnd"] and data["imlist"] == doc["imlist"] and data["source"] == pkl.name
    gt = load_revisited_gt(pkl, [f"d{i}.jpg" for i in range(8)], "medium")  # --gt revisited:gnd.pkl
    assert gt.queries[0].relevant == {0, 3, 5}
    marker = tmp_path / "pwned"
    evil = [("os.system in a list", ["x", _Shell(marker)]),
            ("os.system as the gnd", {"imlist": [], "qimlist": [], "gnd": _Shell(marker)}),
            ("os.system in an object array", {"imlist": np.array([_Shell(marker)], dtype=object)}),
            ("getcwd", {"imlist": _Sneaky()})]
    for label, obj in evil:
        for protocol in (2, 5):
            pkl.write_bytes(pickle.dumps(obj, protocol=protocol))
            with pytest.raises(FormatError, match=r"asks for (posix|os|nt)\.(system|getcwd).*refusing"):
                read_revisited_gnd(pkl)
            with pytest.raises(FormatError, match="refusing"):
                load_restricted_pickle(pkl)
    assert not marker.exists()  # proof that nothing ran: plain pickle.load would have created it
    pickle.loads(pickle.dumps(_Shell(marker)))
    assert marker.exists()
    # hand-made pickles: builtins.eval, and _codecs.encode with a codec other than latin-1
    for raw, pattern in [(b"cbuiltins\neval\n(S'1+1'\ntR.", r"asks for builtins\.eval"),
                         (b"c_codecs\nencode\n(X\x01\x00\x00\x00xX\x06\x00\x00\x00base64tR.",
                          "only latin-1 array bytes"),
                         (pickle.dumps(_official(doc), protocol=2)[:-40], "cannot read .* as a pickle")]:
        pkl.write_bytes(raw)
        with pytest.raises(FormatError, match=pattern):
            read_revisited_gnd(pkl)


# --------------------------------------------------------------- ranking, specs


def test_rank_by_similarity():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((50, 8)).astype(np.float32)
    xq = xb[:3] + 0.01
    ranks = rank_by_similarity(xq, xb)
    assert ranks.shape == (3, 50) and ranks.dtype == np.int64
    assert (ranks == np.argsort(-(xq @ xb.T), axis=1, kind="stable")).all()
    top = rank_by_similarity(xq, xb, exclude_self=[1, -1, 2], k=5)
    assert top.shape == (3, 5) and 1 not in top[0] and (top[1] == ranks[1, :5]).all()
    assert top[0].tolist() == [i for i in ranks[0] if i != 1][:5]
    with pytest.raises(UsageError, match="differ in dimension"):
        rank_by_similarity(xq[:, :4], xb)
    with pytest.raises(UsageError, match="NaN or infinite"):
        rank_by_similarity(np.full((1, 8), np.nan), xb)
    with pytest.raises(UsageError, match="query i is database item i"):
        rank_by_similarity(xq, xb, exclude_self=True)


def test_evaluate_ranks_checks_its_input():
    gt = class_folder_gt(TINY)
    with pytest.raises(UsageError, match="one row per query"):
        evaluate_ranks(np.zeros((2, 6), dtype=np.int64), gt)
    with pytest.raises(UsageError, match="database index 9"):
        evaluate_ranks(np.full((6, 6), 9), gt)
    with pytest.raises(UsageError, match="integer database indices"):
        evaluate_ranks(np.zeros((6, 6)), gt)
    # a truncated top-2 ranking padded with -1 counts unranked positives as missed
    top2 = np.array([[0, 1, -1], [1, 0, -1], [2, 0, -1], [3, 2, -1], [4, 0, -1], [5, 0, -1]])
    res = evaluate_ranks(top2, gt, ks=(1,))
    assert res.queries[0].ap == 1.0 and res.queries[2].ap == 0.0 and res.queries[3].ap == 0.5


def test_parse_gt_spec_errors():
    with pytest.raises(UsageError, match="unknown ground-truth spec 'oxfrod:x'.*valid forms.*Did you mean: oxford"):
        parse_gt_spec("oxfrod:x", TINY)
    with pytest.raises(UsageError, match="needs a file or folder: oxford:GT_DIR"):
        parse_gt_spec("oxford", TINY)
    with pytest.raises(UsageError, match="takes no argument"):
        parse_gt_spec("folders:x", TINY)
    with pytest.raises(UsageError, match="Oxford/Paris ground-truth folder not found"):
        parse_gt_spec("oxford:/nonexistent/gt", TINY)
    assert parse_gt_spec("folders", TINY)[0].protocol == "folders"


def test_ground_truth_values():
    q = Query(name="q", image="q.jpg", index=2, path="q.jpg", relevant=frozenset({1}))
    gt = GroundTruth("groups", (q, q), n_db=3)
    assert gt.query_indices().tolist() == [2, 2] and not gt.revisited and len(gt) == 2
