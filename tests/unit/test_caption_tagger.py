"""Tag lists, tagger discovery, session caching and the WD14 signature checks."""

import os

import numpy as np
import pytest
from tiny_tagger import build_tiny_tagger, write_tags_csv

from lora_foundry.lora_core.caption import tagger as tagger_mod
from lora_foundry.lora_core.caption.tagger import (
    TaggerError,
    clear_tagger_cache,
    find_taggers,
    get_tagger,
    load_tag_list,
)

TAGS = [("general", 9), ("1girl", 0), ("solo", 0), ("miku", 4)]


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_tagger_cache()
    yield
    clear_tagger_cache()


def test_tag_list_categories(tmp_path):
    tags = load_tag_list(write_tags_csv(tmp_path / "t.csv", TAGS))
    assert tags.names == ("general", "1girl", "solo", "miku")
    assert list(tags.indices(9)) == [0] and list(tags.indices(0)) == [1, 2] and list(tags.indices(4)) == [3]


def test_tag_list_errors_name_the_file(tmp_path):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(TaggerError, match="bad.csv has no header"):
        load_tag_list(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text("tag_id,name,category,count\n1,x,notanumber,3\n")
    with pytest.raises(TaggerError, match="bad2.csv line 2"):
        load_tag_list(tmp_path / "bad2.csv")


def test_session_is_reused_and_reloaded_when_file_changes(tmp_path):
    model = build_tiny_tagger(tmp_path / "m", TAGS, probs=[0.5] * 4)
    first = get_tagger(model)
    assert get_tagger(model) is first and get_tagger(model).session is first.session
    assert first.image_size == 16 and first.fixed_batch is None and first.input_name == "input_1:0"
    assert first.providers[-1] == "CPUExecutionProvider"
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert get_tagger(model) is not first


def test_cache_is_bounded(tmp_path):
    models = [build_tiny_tagger(tmp_path / f"m{i}", TAGS) for i in range(tagger_mod.CACHE_SIZE + 1)]
    first = get_tagger(models[0])
    for model in models[1:]:
        get_tagger(model)
    assert len(tagger_mod._cache) == tagger_mod.CACHE_SIZE
    assert get_tagger(models[0]) is not first


def test_predict_batches_and_fixed_batch_models(tmp_path):
    dynamic = get_tagger(build_tiny_tagger(tmp_path / "d", TAGS, probs=[0.1, 0.2, 0.3, 0.4]))
    fixed = get_tagger(build_tiny_tagger(tmp_path / "f", TAGS, probs=[0.1, 0.2, 0.3, 0.4], batch_dim=1))
    batch = np.zeros((3, 16, 16, 3), np.float32)
    assert fixed.fixed_batch == 1
    np.testing.assert_allclose(dynamic.predict(batch), np.tile([0.1, 0.2, 0.3, 0.4], (3, 1)), rtol=1e-5)
    np.testing.assert_allclose(fixed.predict(batch), dynamic.predict(batch))


def test_csv_of_another_model_is_refused(tmp_path):
    model = build_tiny_tagger(tmp_path / "m", TAGS)
    write_tags_csv(tmp_path / "m" / "selected_tags.csv", TAGS[:2])
    with pytest.raises(TaggerError, match="outputs 4 scores but its tag list has 2 tags"):
        get_tagger(model)


def test_missing_csv_says_where_to_put_it(tmp_path):
    model = build_tiny_tagger(tmp_path / "m", TAGS)
    (tmp_path / "m" / "selected_tags.csv").unlink()
    with pytest.raises(TaggerError, match="put selected_tags.csv beside it"):
        get_tagger(model)


def test_find_taggers_both_layouts(tmp_path):
    build_tiny_tagger(tmp_path / "wd-vit", TAGS)
    build_tiny_tagger(tmp_path, TAGS, layout="named")
    (tmp_path / "orphan.onnx").write_bytes(b"")
    found, problems = find_taggers([tmp_path, tmp_path / "missing"])
    assert [(t.name, t.tags.name) for t in found] == [
        ("tiny.onnx", "tiny.csv"),
        ("wd-vit/model.onnx", "selected_tags.csv"),
    ]
    assert len(problems) == 1 and "orphan.onnx" in problems[0]


def test_provider_choice():
    assert tagger_mod.choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    both = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert tagger_mod.choose_providers(both) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert (
        tagger_mod.choose_providers(["DmlExecutionProvider", "CPUExecutionProvider"])[0]
        == "DmlExecutionProvider"
    )


def test_gpu_provider_is_asked_for_and_a_failing_one_falls_back_to_cpu(tmp_path, monkeypatch, caplog):
    import onnxruntime as ort

    model = build_tiny_tagger(tmp_path / "m", TAGS, probs=[0.5] * 4)
    asked = []
    real = ort.InferenceSession

    def session(path, sess_options=None, providers=None):
        asked.append(list(providers))
        if "CUDAExecutionProvider" in providers:
            raise RuntimeError("libcudnn.so.9: cannot open shared object file")
        return real(path, sess_options=sess_options, providers=providers)

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", session)
    tagger = get_tagger(model)
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]]
    assert tagger.providers == ["CPUExecutionProvider"]
    assert "CUDAExecutionProvider could not start" in caplog.text and "libcudnn" in caplog.text
