"""One task vocabulary: every per-task table of the project names only task heads of `model.TASKS` and task types
of `model.TASK_TYPES`, with the type, size and query count the task table gives them.

Tables read (module attributes): model.TASKS / TASK_TYPES / BASE_TASKS / FULL_TASKS / NAIVE_HEAD_TYPES;
data.DATASETS / SYNTHETIC_ONLY; data.conventions.TASK_TYPES / DENSE_TYPES / LANDMARK_FLIP / EXPRESSIONS;
data.synthetic.TASK_FIELDS / SCHEMES and the maps of data.synthetic_labels;
losses.TASK_TYPES and the branches of losses.task_loss; metrics._NME_UNITS; evaluate.BENCHMARKS / _TABLE_COLUMNS;
train_config.PRESETS / BASE_HEADS / FULL_HEADS / DEMO_HEADS / TRANSFER_BATCH; checkpoint.OFFICIAL_TASK_NAMES / NAIVE_HEADS /
NAIVE_UNNAMED_CLASSIFIER; predict.CLASS_NAMES / ATTRIBUTE_NAMES. A last test scans every string
literal of the project's modules for near-misses of a task or type name (a misspelt key in a table nobody listed).
"""
import ast
import inspect
import os
import re

import pytest

import checkpoint
import data
import evaluate
import losses
import framing
import metrics
import photo_io
import train_config
from data import conventions, synthetic
from model import BASE_TASKS, FULL_TASKS, NAIVE_HEAD_TYPES, TASK_TYPES, TASKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSE = {t for t, s in TASKS.items() if s.type in ("landmarks", "parsing", "visibility")}


def _unknown(names, allowed):
    return sorted(set(names) - set(allowed))


def of_type(kind):
    return {t for t, s in TASKS.items() if s.type == kind}


# ------------------------------------------------------------------------------------------------ model.py

def test_task_table_is_self_consistent():
    assert len(set(TASK_TYPES)) == len(TASK_TYPES)
    assert TASK_TYPES[:6] == conventions.TASK_TYPES, "the paper's six types come first, in the paper's order"
    assert _unknown((s.type for s in TASKS.values()), TASK_TYPES) == []
    assert {s.size for s in TASKS.values()} <= {512, 112}
    assert all((s.size == 512) == (t in DENSE) for t, s in TASKS.items()), "dense heads are the 512-px group"
    assert _unknown(BASE_TASKS, TASKS) == [] and _unknown(FULL_TASKS, TASKS) == []
    assert set(NAIVE_HEAD_TYPES) == set(TASK_TYPES)


# ------------------------------------------------------------------------------------------------ data/

def test_dataset_table_matches_task_table():
    # a dataset is named as the head that trains on it, or is an evaluation-only set mapped to one (data.EVAL_HEAD)
    assert _unknown(data.DATASETS, set(TASKS) | set(data.EVAL_HEAD)) == []
    assert _unknown(data.EVAL_HEAD.values(), TASKS) == []
    assert _unknown(TASKS, set(data.DATASETS) | set(data.SYNTHETIC_ONLY)) == [], \
        "every task head needs a loader for its real dataset, or is a synthetic-only transfer scheme"
    assert _unknown(data.SYNTHETIC_ONLY, TASKS) == [] and not set(data.SYNTHETIC_ONLY) & set(data.DATASETS)
    for name, (loader, splits, kind) in data.DATASETS.items():
        assert kind == TASKS[data.EVAL_HEAD.get(name, name)].type and kind in TASK_TYPES, name
        assert kind in getattr(loader, "task_types", (loader.task_type,)), f"{loader.__name__}.task_type"
        assert splits and all(isinstance(s, str) for s in splits), name


def test_data_conventions_use_the_model_types():
    assert tuple(conventions.TASK_TYPES) + tuple(conventions.EXTRA_TASK_TYPES) == tuple(TASK_TYPES)
    assert _unknown(conventions.DENSE_TYPES, TASK_TYPES) == []
    for t, s in TASKS.items():
        assert conventions.input_group(s.type) == ("dense" if t in DENSE else "global"), t
    assert set(conventions.LANDMARK_FLIP) <= {TASKS[t].queries for t in of_type("landmarks")}
    assert all(len(conventions.EXPRESSIONS) == TASKS[t].queries for t in of_type("expression"))
    assert set(synthetic.TASK_FIELDS) == set(TASK_TYPES), "the synthetic faces label every task type"


def test_synthetic_transfer_schemes_fit_their_heads():
    from data import synthetic_labels as sl
    assert set(data.SYNTHETIC_ONLY) <= set(synthetic.SCHEMES)
    for head, kind in synthetic.SCHEMES.items():
        assert head in TASKS and TASKS[head].type == kind, head
    for head, point_map in sl.POINT_MAPS.items():
        assert len(point_map) == TASKS[head].queries, head
        assert all(0 <= i < 68 for idx in point_map for i in idx), head
    assert len(sl.LAPA_FROM_CELEBAMASK) == len(conventions.CELEBAMASK_CLASSES) == TASKS["celebamask_hq"].queries
    assert set(sl.LAPA_FROM_CELEBAMASK) == set(range(TASKS["lapa"].queries)), "every LaPa class is drawn"
    assert len(sl.SYNTH_ATTRIBUTES) == TASKS["synth_attr"].queries
    assert not set(sl.SYNTH_ATTRIBUTES) & set(conventions.CELEBA_ATTRIBUTES), "a new attribute set"


# ------------------------------------------------------------------------------------------------ losses.py

def _compared_strings(func, variable):
    """String constants compared (==, !=, in) with the name `variable` anywhere in `func`."""
    found = set()
    for node in ast.walk(ast.parse(inspect.getsource(func).lstrip())):
        if isinstance(node, ast.Compare) and isinstance(node.left, ast.Name) and node.left.id == variable:
            for c in node.comparators:
                elts = c.elts if isinstance(c, (ast.Tuple, ast.List, ast.Set)) else [c]
                found |= {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return found


def test_loss_dispatch_covers_exactly_the_task_types():
    assert tuple(losses.TASK_TYPES) == tuple(TASK_TYPES)
    branches = _compared_strings(losses.task_loss, "task_type")
    assert branches == set(TASK_TYPES), f"task_loss branches {sorted(branches)}"


def test_loss_dispatch_refuses_an_unknown_type():
    with pytest.raises(ValueError, match="unknown task type"):
        losses.task_loss("landmark", {}, {})


# ------------------------------------------------------------------------------------------------ metrics / evaluate

def test_metric_and_benchmark_tables():
    for name, (points, default, units) in metrics._NME_UNITS.items():
        assert name in TASKS and TASKS[name].type == "landmarks" and TASKS[name].queries == points, name
        assert default in units, name
    for table, name, split, kind, extra in evaluate.BENCHMARKS:
        head = data.EVAL_HEAD.get(name, name)
        assert head in TASKS and TASKS[head].type == table, (table, name)
        assert kind in evaluate.KINDS, (name, kind)
        assert split in data.DATASETS[name][1], (name, split)
        assert kind != "nme" or name in metrics._NME_UNITS, f"{name}: no NME unit in metrics._NME_UNITS"
    assert _unknown(evaluate._TABLE_COLUMNS, TASK_TYPES + ("verification",)) == []
    tables = {b[0] for b in evaluate.BENCHMARKS} | {"verification"}
    assert tables <= set(evaluate._TABLE_COLUMNS), "every benchmark table has columns"


# ------------------------------------------------------------------------------------------ train_config.py

def test_training_presets_name_only_known_heads():
    for preset, cfg in train_config.PRESETS.items():
        assert _unknown(cfg.heads, TASKS) == [], preset
        assert all(len(v) == 2 and v[0] > 0 and v[1] > 0 for v in cfg.heads.values()), preset
    assert set(train_config.BASE_HEADS) == set(BASE_TASKS)
    assert set(train_config.FULL_HEADS) == set(FULL_TASKS)
    assert _unknown(train_config.DEMO_HEADS, TASKS) == []
    assert _unknown(train_config.TRANSFER_BATCH, TASKS) == []


# ------------------------------------------------------------------------------------------------ checkpoint.py

def test_converter_name_maps():
    ours = list(checkpoint.OFFICIAL_TASK_NAMES.values())
    assert _unknown(ours, TASKS) == [] and len(set(ours)) == len(ours)
    assert _unknown(checkpoint.NAIVE_HEADS.values(), TASK_TYPES) == []
    for theirs, name in checkpoint.OFFICIAL_TASK_NAMES.items():
        prefix = theirs.split("_")[0]                           # their task-type prefix: align_, parsing_, ...
        assert checkpoint.NAIVE_HEADS.get(prefix) == TASKS[name].type, theirs
    for prefix, name in checkpoint.NAIVE_UNNAMED_CLASSIFIER.items():
        assert name in TASKS and TASKS[name].type == checkpoint.NAIVE_HEADS.get(prefix), prefix


# ------------------------------------------------------------------------------------------------ predict.py

def test_prediction_label_tables():
    for name, classes in photo_io.CLASS_NAMES.items():
        assert name in TASKS and TASKS[name].type == "parsing" and len(classes) == TASKS[name].queries, name
    for name, attrs in photo_io.ATTRIBUTE_NAMES.items():
        assert name in TASKS and TASKS[name].type == "attributes" and len(attrs) == TASKS[name].queries, name


def test_framing_table_names_real_heads_and_known_framings():
    assert _unknown(framing.REAL_FRAMING, TASKS) == []
    assert _unknown(framing.REAL_FRAMING.values(), framing.FRAMINGS) == []
    for name, f in framing.REAL_FRAMING.items():
        assert framing.FRAMINGS[f][0] == TASKS[name].size, f"{name}: framing {f!r} is for another input size"


# ------------------------------------------------------------------------------------------------ every module

def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def near_misses(strings, vocabulary):
    """Strings within one edit (two for names of 8+ letters) of a vocabulary word without being one. Words of four
    letters or fewer (age, pose, race; not 300w) sit one edit from too many ordinary words (page, nose, face) to be scanned."""
    vocab = set(vocabulary)
    out = []
    for s in strings:
        if s in vocab or len(s) < 3:
            continue
        for v in vocab:
            if len(v) <= 4 and v.isalpha():
                continue
            if abs(len(s) - len(v)) <= 2 and _edit_distance(s, v) <= (2 if len(v) >= 8 else 1):
                out.append((s, v))
    return sorted(out)


def _string_literals(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    pieces = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}   # f-string parts
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in pieces and re.fullmatch(r"[A-Za-z0-9_\-]+", n.value)}


# Reviewed literals that sit one edit from a task or type name and mean something else: {file: {literal, ...}}.
NOT_TASK_NAMES = {"predict.py": {"_parsing"}}   # the suffix of a parsing head's mask file name


def _project_modules():
    for folder in (ROOT, os.path.join(ROOT, "data")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py") and name != "setup.py":
                yield os.path.join(folder, name)


def test_near_miss_detector_flags_misspellings():
    vocab = set(TASKS) | set(TASK_TYPES)
    assert near_misses(["landmark", "celebamask-hq", "ffhq", "utkfaces", "300W", "rafdb"], vocab) == [
        ("300W", "300w"), ("celebamask-hq", "celebamask_hq"), ("landmark", "landmarks"), ("utkfaces", "utkface")]


def test_no_string_in_the_project_is_a_near_miss_of_a_task_name():
    vocab = set(TASKS) | set(TASK_TYPES)
    bad = {}
    for path in _project_modules():
        rel = os.path.relpath(path, ROOT)
        found = [m for m in near_misses(_string_literals(path), vocab) if m[0] not in NOT_TASK_NAMES.get(rel, ())]
        if found:
            bad[rel] = found
    assert bad == {}, f"string literals one edit from a task or type name: {bad}"
