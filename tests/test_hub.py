"""BitFit adapters on the Hub: push, load (by id, by revision, via AutoPeftModel, offline) and the model card.

Everything runs against ``tests/hub_server.py``, a local Hub-compatible server driven by the real
``huggingface_hub`` client; no test touches the network.
"""

from __future__ import annotations

import json
import re
import socket
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model
from hub_server import HubServer, point_hub_client_at
from peft import AutoPeftModelForSequenceClassification, LoraConfig, PeftModel, get_peft_model

import bitfit_peft
import bitfit_peft.files.hub as bhub
from bitfit_peft import BitFitConfig

IDS = torch.tensor([[2, 10, 11, 12, 3, 0], [2, 20, 21, 3, 0, 0]])
MASK = (IDS != 0).long()


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hub_server() -> Iterator[HubServer]:
    with HubServer() as server:
        yield server



@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    point_hub_client_at(hub_server.url, tmp_path / "hf_home", monkeypatch)
    return hub_server


def _repo() -> str:
    return f"user/bitfit-{uuid.uuid4().hex[:8]}"


def _bitfit_model(seed: int = 0, adapter_seed: int = 1, **cfg: object) -> PeftModel:
    """Tiny BERT classifier with random (non-zero) deltas and a perturbed head, so loading is really tested."""
    base = make_tiny_model("bert", task="seq_cls", seed=seed)
    torch.manual_seed(adapter_seed)
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", init_weights=False, **cfg))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _logits(model: torch.nn.Module, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK, **kwargs).logits


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n"), text[:80]
    return yaml.safe_load(text.split("---\n", 2)[1])


# ---------------------------------------------------------------------------------------------- push / load
def test_push_then_from_pretrained(hub: HubServer) -> None:
    repo = _repo()
    model = _bitfit_model()
    expected = _logits(model)
    n_before = len(hub.requests)
    info = bhub.push_to_hub(model, repo)

    files = hub.files(repo)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert json.loads(files["adapter_config.json"])["peft_type"] == "BITFIT"
    assert info.oid == hub.history(repo)[0]
    paths = [p for _, p in hub.requests[n_before:]]
    assert "/api/repos/create" in paths and any("/preupload/" in p for p in paths)
    assert any("/commit/main" in p for p in paths)

    card = files["README.md"].decode()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft" and "bitfit" in meta["tags"]
    assert "import bitfit_peft" in card and repo in card

    loaded = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), repo).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=0)
    assert not hub.unknown, hub.unknown


def test_load_adapter_by_name_onto_existing_peft_model(hub: HubServer) -> None:
    repo = _repo()
    remote = _bitfit_model(adapter_seed=7)
    bhub.push_to_hub(remote, repo)
    expected = _logits(remote)

    local = _bitfit_model(adapter_seed=3)  # holds "default" (other deltas)
    local_out = _logits(local)
    local.load_adapter(repo, adapter_name="task_b")
    local.set_adapter("task_b")
    torch.testing.assert_close(_logits(local), expected, rtol=0, atol=0)
    local.set_adapter("default")
    torch.testing.assert_close(_logits(local), local_out, rtol=0, atol=0)


def test_mixed_batch_uses_each_adapters_head(hub: HubServer) -> None:
    repo = _repo()
    remote = _bitfit_model(adapter_seed=7)
    bhub.push_to_hub(remote, repo)
    local = _bitfit_model(adapter_seed=3)
    local.load_adapter(repo, adapter_name="task_b")
    mixed = _logits(local, adapter_names=["task_b", "default"])
    torch.testing.assert_close(mixed[0], _logits(remote)[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[1], _logits(_bitfit_model(adapter_seed=3))[1], rtol=0, atol=1e-6)


def test_transformers_load_adapter_from_hub(hub: HubServer) -> None:
    repo = _repo()
    remote = _bitfit_model(adapter_seed=5)
    bhub.push_to_hub(remote, repo)
    base = make_tiny_model("bert", task="seq_cls")
    base.load_adapter(repo, adapter_name="task_a")
    torch.testing.assert_close(_logits(base), _logits(remote), rtol=0, atol=1e-6)


def test_auto_peft_model_from_hub(hub: HubServer, tmp_path: Path) -> None:
    base_dir = tmp_path / "base"
    make_tiny_model("bert", task="seq_cls").save_pretrained(base_dir)
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(base_dir)
    torch.manual_seed(2)
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    repo = _repo()
    bhub.push_to_hub(model, repo)
    config = json.loads(hub.files(repo)["adapter_config.json"])
    assert config["base_model_name_or_path"] == str(base_dir)

    auto = AutoPeftModelForSequenceClassification.from_pretrained(repo).eval()
    assert isinstance(auto.base_model, bitfit_peft.BitFitModel)
    torch.testing.assert_close(_logits(auto), _logits(model), rtol=0, atol=0)


def test_revisions_push_twice_load_first(hub: HubServer) -> None:
    from huggingface_hub import HfApi

    repo = _repo()
    model = _bitfit_model(adapter_seed=11)
    first_out = _logits(model)
    first = bhub.push_to_hub(model, repo, commit_message="v1")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".bitfit_delta." in name:
                param.add_(0.5)
    second_out = _logits(model)
    second = bhub.push_to_hub(model, repo, commit_message="v2")
    assert first.oid != second.oid and hub.history(repo)[:2] == [second.oid, first.oid]
    assert not torch.allclose(first_out, second_out)

    info = HfApi().model_info(repo, revision=first.oid)
    assert info.sha == first.oid and "adapter_model.safetensors" in {s.rfilename for s in info.siblings}

    old = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), repo, revision=first.oid)
    new = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), repo)
    torch.testing.assert_close(_logits(old.eval()), first_out, rtol=0, atol=0)
    torch.testing.assert_close(_logits(new.eval()), second_out, rtol=0, atol=0)

    # a branch: push to "dev", main stays at v2
    bhub.push_to_hub(model, repo, revision="dev")
    assert hub.repos[repo].branches["main"] == second.oid and "dev" in hub.repos[repo].branches


def test_offline_mode_uses_the_cache(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    repo = _repo()
    model = _bitfit_model(adapter_seed=4)
    bhub.push_to_hub(model, repo)
    online = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), repo).eval()

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    n_before = len(hub.requests)
    offline = PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), repo).eval()
    assert len(hub.requests) == n_before, hub.requests[n_before:]
    torch.testing.assert_close(_logits(offline), _logits(online), rtol=0, atol=0)

    with pytest.raises(ValueError, match="adapter_config.json"):  # never downloaded -> clear error, no request
        PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), _repo())
    assert len(hub.requests) == n_before


def test_missing_repo_is_a_clear_error(hub: HubServer) -> None:
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json' at 'user/does-not-exist'"):
        PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), "user/does-not-exist")


def test_unreachable_hub_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    point_hub_client_at(dead, tmp_path / "hf_home", monkeypatch)
    import huggingface_hub.utils._http as hf_http

    sleeps: list[float] = []  # the client backs off ~23 s before giving up; record instead of waiting
    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    fake_time.sleep = sleeps.append
    monkeypatch.setattr(hf_http, "time", fake_time)
    model = _bitfit_model()
    with pytest.raises(bhub.HubUnreachableError, match=r"Cannot reach the Hugging Face Hub at http://127\.0\.0\.1"):
        bhub.push_to_hub(model, "user/anything")
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config.json' at 'user/anything'") as err:
        PeftModel.from_pretrained(make_tiny_model("bert", task="seq_cls"), "user/anything")
    assert "connection" in str(err.value.__cause__ or err.value.__context__).lower()
    assert sleeps and sum(sleeps) > 10  # what a user waits before that error


def test_push_keeps_user_text_of_an_existing_card(hub: HubServer) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    repo = _repo()
    model = _bitfit_model()
    bhub.push_to_hub(model, repo)
    readme = hub.files(repo)["README.md"].decode()
    edited = readme.replace("library_name: peft", "library_name: peft\nlicense: mit") + "\n## My notes\n\nKeep me.\n"
    HfApi().create_commit(repo, [CommitOperationAdd("README.md", edited.encode())], commit_message="edit card")
    bhub.push_to_hub(model, repo)
    card = hub.files(repo)["README.md"].decode()
    assert "Keep me." in card and card.count(bhub.BEGIN) == 1
    meta = _front_matter(card)
    assert meta["license"] == "mit" and "bitfit" in meta["tags"]


# ---------------------------------------------------------------------------------------------- card
def test_bitfit_save_pretrained_writes_the_bitfit_card(tmp_path: Path) -> None:
    model = _bitfit_model()
    bitfit_peft.save_pretrained(model, tmp_path)
    card = (tmp_path / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "peft"
    assert {"bitfit", "peft"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "text-classification"
    assert "base_model" not in meta  # unknown / local base: left out of the YAML the Hub validates
    assert not any(t.startswith("base_model:adapter:") for t in meta["tags"])
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    summary = bhub.read_adapters(tmp_path)[0]
    assert summary.file_size == size and summary.delta_params > 0 and summary.other_params > 0
    assert f"{summary.trainable_params:,}" in card and "% of" in card
    assert "import bitfit_peft" in card and "PeftModel.from_pretrained" in card
    assert card.index("import bitfit_peft") < card.index("from peft import")


def test_card_base_model_and_regeneration(tmp_path: Path) -> None:
    model = _bitfit_model()
    bitfit_peft.save_pretrained(model, tmp_path)
    bhub.write_model_card(tmp_path, base_model="google-bert/bert-base-uncased", tags=["sms"])
    text = (tmp_path / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["base_model"] == "google-bert/bert-base-uncased"
    assert "base_model:adapter:google-bert/bert-base-uncased" in meta["tags"] and "sms" in meta["tags"]
    assert 'from_pretrained("google-bert/bert-base-uncased")' in text

    (tmp_path / "README.md").write_text(text + "\n## Notes by a human\n")
    bhub.write_model_card(tmp_path, base_model="google-bert/bert-base-uncased")
    again = (tmp_path / "README.md").read_text()
    assert again.count(bhub.BEGIN) == 1 and "Notes by a human" in again


def test_card_lists_named_adapters(tmp_path: Path) -> None:
    model = _bitfit_model()
    model.add_adapter("task_b", BitFitConfig(task_type="SEQ_CLS", bias_terms=["query"]))
    bitfit_peft.save_pretrained(model, tmp_path)
    names = [a.name for a in bhub.read_adapters(tmp_path)]
    assert names == ["default", "task_b"]
    card = (tmp_path / "README.md").read_text()
    assert "`task_b`" in card and "`task_b/adapter_model.safetensors`" in card


def test_pefts_own_save_keeps_pefts_card_for_every_tuner(tmp_path: Path) -> None:
    _bitfit_model().save_pretrained(tmp_path / "bitfit")  # PEFT's save_pretrained is PEFT's own, also for BitFit
    assert bhub.BEGIN not in (tmp_path / "bitfit" / "README.md").read_text()


def test_other_tuners_keep_pefts_card(tmp_path: Path) -> None:
    base = make_tiny_model("bert", task="seq_cls")
    lora = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", target_modules=["query"], r=2))
    lora.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert bhub.BEGIN not in text and "bitfit" not in _front_matter(text).get("tags", [])


def test_write_model_card_from_model_saves_first(tmp_path: Path) -> None:
    path = bhub.write_model_card(_bitfit_model(), tmp_path / "out", repo_id="user/x")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert 'PeftModel.from_pretrained(base, "user/x")' in path.read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="save the adapter first"):
        bhub.build_model_card(tmp_path / "empty")


def _python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


def test_the_cards_loading_snippets_run_as_written(hub: HubServer) -> None:
    """A 3-label adapter of a base on the Hub: every snippet of its freshly pushed card loads it as trained."""
    from transformers import AutoModelForSequenceClassification

    base_repo = f"user/tiny-base-{uuid.uuid4().hex[:6]}"
    make_tiny_model("bert", task="base").push_to_hub(base_repo)
    names = {0: "neg", 1: "neutral", 2: "pos"}
    base = AutoModelForSequenceClassification.from_pretrained(base_repo, num_labels=3, id2label=names)
    torch.manual_seed(4)
    model = get_peft_model(base, BitFitConfig(task_type="SEQ_CLS", init_weights=False)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param))
    expected = _logits(model)
    repo = _repo()
    bhub.push_to_hub(model, repo)

    uploaded = json.loads(hub.files(repo)["adapter_config.json"])  # the labels travel to the Hub with the adapter
    assert uploaded["num_labels"] == 3 and uploaded["id2label"] == {"0": "neg", "1": "neutral", "2": "pos"}
    card = hub.files(repo)["README.md"].decode()
    meta = _front_matter(card)
    assert meta["base_model"] == base_repo and f"base_model:adapter:{base_repo}" in meta["tags"]
    assert meta["library_name"] == "peft" and "bitfit" in meta["tags"] and meta["pipeline_tag"] == "text-classification"
    assert "| 1 | neutral |" in card
    blocks = _python_blocks(card)
    assert len(blocks) == 2, card  # PeftModel.from_pretrained(base) and AutoPeftModelForSequenceClassification
    for code in blocks:
        scope: dict = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the card's own snippet, as a user runs it
        loaded = scope["model"].eval()
        torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)
        assert loaded.config.id2label[1] == "neutral"


def test_a_local_base_is_named_by_hub_id_or_folder_name(tmp_path: Path) -> None:
    from bitfit_peft.files.model_card import public_base_id

    folder = tmp_path / "my-base"
    make_tiny_model("bert", task="seq_cls").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["_name_or_path"] = "google-bert/bert-base-uncased"
    (folder / "config.json").write_text(json.dumps(config))
    assert public_base_id(folder) == "google-bert/bert-base-uncased"
    assert public_base_id(folder, "me/my-base") == "me/my-base"
    config["_name_or_path"] = str(folder)
    (folder / "config.json").write_text(json.dumps(config))
    assert public_base_id(folder) is None
    model = _bitfit_model()
    bitfit_peft.save_pretrained(model, tmp_path / "adapter")
    bhub.write_model_card(tmp_path / "adapter", base_model=str(folder))
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert str(tmp_path) not in card and "`my-base` (a local model)" in card and "local folder" in card
