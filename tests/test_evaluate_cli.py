"""evaluate.py's command line on a fixture benchmark: a tiny checkpoint, a corrupt image (an error naming the file,
or with --skip-corrupt a counted skip in the table and the JSON), DataLoader workers, and --compile."""
import json

import pytest
import torch

import checkpoint
import evaluate
import fixtures
from model import Faceptor, FaceptorConfig


def tiny_checkpoint(path, tasks):
    torch.manual_seed(0)
    cfg = FaceptorConfig.tiny(tasks=tasks, size_512=32, size_112=16)
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": Faceptor(cfg).state_dict(),
                "model_config": cfg.to_dict(), "config": {"data": "folders"}, "stage": 1, "step": 0,
                "kind": "faceptor", "preset": "tiny"}, path)
    return str(path)


@pytest.fixture
def corrupt_rafdb(tmp_path):
    fixtures.write_rafdb(str(tmp_path / "data" / "rafdb"))
    bad = tmp_path / "data" / "rafdb" / "Image" / "aligned" / "test_0003_aligned.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return tiny_checkpoint(tmp_path / "model.pt", ("rafdb",)), str(tmp_path / "data"), str(bad)


def test_cli_corrupt_image_is_an_error_naming_the_file(corrupt_rafdb):
    ckpt, root, bad = corrupt_rafdb
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main([ckpt, "--data-root", root, "--num-workers", "0", "--log-every", "0"])
    assert bad in str(exit_info.value.code) and "rafdb/test" in str(exit_info.value.code)


def test_cli_skip_corrupt_counts_in_table_and_json(corrupt_rafdb, tmp_path, capsys):
    ckpt, root, bad = corrupt_rafdb
    js = tmp_path / "out" / "results.json"
    evaluate.main([ckpt, "--data-root", root, "--skip-corrupt", "--num-workers", "2", "--batch-size", "2",
                   "--json", str(js), "--log-every", "1"])
    out = capsys.readouterr()
    res = json.loads(js.read_text())["benchmarks"]["rafdb/test"]
    assert res["n"] == 2 and res["skipped"] == 1 and bad in res["skipped_errors"][0]
    assert 0 <= res["accuracy"] <= 1 and res["accuracy"] * 2 == round(res["accuracy"] * 2)   # k of 2 faces
    assert "| rafdb/test | 2 |" in out.out and "| 1 corrupt image skipped |" in out.out
    assert "rafdb/test: batch 1/2 (2/3 images" in out.err                  # progress, on stderr


def test_compile_keeps_outputs_and_parameter_names():
    torch.manual_seed(0)
    model = Faceptor(FaceptorConfig.tiny(tasks=("300w",), size_512=32)).eval()       # encoder + pixel decoder
    x512 = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model.predict(images_512=x512)
    keys = list(model.state_dict())
    evaluate.compile_model(model, backend="eager")                        # dynamo traces; no code generation
    with torch.no_grad():
        got = model.predict(images_512=x512)
    assert list(model.state_dict()) == keys
    for t in want:
        for k in want[t]:
            diff = (got[t][k] - want[t][k]).abs()
            assert diff.max() <= 1e-5, f"{t}.{k}: max {diff.max():.3g} mean {diff.mean():.3g}"
    assert model.encoder._compiled_call_impl is not None                 # both now run through dynamo
    assert model.pixel_decoder._compiled_call_impl is not None
