"""Weights through the Hugging Face Hub, without the network: ``hf-hub:ORG/NAME[@REVISION]`` read from a folder laid
out as the Hub's cache (offline), ``push_to_hub`` against the Hub's HTTP API answered in-process, the model card
``save_model`` writes, and the one-line install hint when ``huggingface_hub`` is missing."""

from __future__ import annotations

import base64
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mal

if importlib.util.find_spec("huggingface_hub"):
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

#: Tests that talk to huggingface_hub (the others check what mal writes, or mal without it).
needs_hub = pytest.mark.skipif(
    importlib.util.find_spec("huggingface_hub") is None, reason="the hub extra: pip install 'mal-vision[hub]'"
)
SMALL = dict(dim=32, depth=2, num_heads=2, in_chans=1, num_classes=10)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def small() -> torch.nn.Module:
    torch.manual_seed(0)
    return mal.create_model("mal_micro", **SMALL).eval()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache at ``tmp_path/hub``, offline: ``huggingface_hub`` reads its environment at import, so its
    constants are set as well as the variables."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_model(cache: Path, repo_id: str, model: torch.nn.Module, commit: str = COMMIT, ref: str = "main") -> Path:
    """``model`` saved as the Hub's cache holds a download of ``repo_id``: ``models--ORG--NAME/refs/<ref>`` names the
    commit, ``snapshots/<commit>/`` holds its files."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = mal.save_model(model, repo / "snapshots" / commit)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@needs_hub
def test_load_model_and_create_model_from_the_hub_cache_give_the_saved_outputs(offline_cache):
    model = small()
    cache_model(offline_cache, "org/mal-micro", model)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(mal.load_model("hf-hub:org/mal-micro")(x), expected)
        assert torch.equal(mal.create_model("mal_micro", pretrained="hf-hub:org/mal-micro").eval()(x), expected)
        assert torch.equal(mal.create_model("hf-hub:org/mal-micro").eval()(x), expected)  # timm's spelling
        enc = mal.create_encoder("mal_micro", pretrained="hf-hub:org/mal-micro").eval()
        assert torch.equal(enc(x), model.encoder(x))


@needs_hub
def test_a_revision_picks_that_commit(offline_cache):
    old, new = small(), mal.create_model("mal_micro", **{**SMALL, "num_classes": 3}).eval()
    cache_model(offline_cache, "org/m", old, commit=COMMIT)
    cache_model(offline_cache, "org/m", new, commit="f" * 40)  # refs/main now names the newer commit
    assert mal.load_model("hf-hub:org/m").cfg.num_classes == 3
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(mal.load_model(f"hf-hub:org/m@{COMMIT}")(x), old(x))


@needs_hub
def test_a_repo_missing_offline_is_one_line_naming_it(offline_cache):
    with pytest.raises(FileNotFoundError) as e:
        mal.load_model("hf-hub:org/nowhere")
    message = str(e.value)
    assert "'org/nowhere'" in message and "not in the cache" in message and "HF_HUB_OFFLINE" in message
    assert "\n" not in message
    with pytest.raises(FileNotFoundError, match="'org/nowhere'"):
        mal.create_model("mal_micro", pretrained="hf-hub:org/nowhere")


@needs_hub
def test_a_cached_snapshot_without_weights_is_named(offline_cache):
    snapshot = cache_model(offline_cache, "org/half", small())
    (snapshot / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"'org/half' has no model\.safetensors"):
        mal.load_model("hf-hub:org/half")


def test_without_huggingface_hub_a_hub_name_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    calls = [
        lambda: mal.load_model("hf-hub:org/m"),
        lambda: mal.create_model("mal_micro", pretrained="hf-hub:org/m"),
        lambda: mal.push_to_hub(small(), "org/m"),
    ]
    for call in calls:
        with pytest.raises(ImportError) as e:
            call()
        assert "pip install 'mal-vision[hub]'" in str(e.value) and "\n" not in str(e.value)


# -- push_to_hub against the Hub's HTTP API ---------------------------------------------------------------------


class FakeHub:
    """The Hub's endpoints that ``create_repo`` + ``upload_folder`` call (create, preupload, commit, and the check of
    a README's front matter), answered with minimal valid JSON, and a repo ``org/nowhere`` that does not exist; every
    request is recorded. Files are declared "regular" (sent inside the commit), so no LFS or Xet storage is
    involved."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, bytes]] = []

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict, dict[str, str]]:
        """``(status, JSON payload, headers)`` for a request."""
        self.requests.append((method, path, body))
        if method == "GET" and path.startswith("/api/models/org/nowhere"):  # the Hub names its 404s in a header
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if method == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
            return 200, {"url": f"{constants.ENDPOINT}/{repo_id}", "name": repo_id, "id": "1"}, {}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}, {}
        if method == "POST" and re.fullmatch(r"/api/models/(.+)/preupload/main", path):
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]  # fmt: skip
            return 200, {"files": files}, {}
        if method == "POST" and (m := re.fullmatch(r"/api/models/(.+)/commit/main", path)):
            return 200, {"commitUrl": f"{constants.ENDPOINT}/{m.group(1)}/commit/{COMMIT}", "commitOid": COMMIT}, {}
        return 404, {"error": f"{method} {path} is not answered by this test"}, {}

    def commit(self) -> tuple[str, dict, dict[str, bytes]]:
        """The repo id, header and files (path -> bytes) of the one commit received."""
        commits = [(p, b) for m, p, b in self.requests if p.endswith("/commit/main")]
        assert len(commits) == 1
        path, body = commits[0]
        lines = [json.loads(line) for line in body.decode().splitlines() if line]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                 for line in lines if line["key"] == "file"}  # fmt: skip
        return re.fullmatch(r"/api/models/(.+)/commit/main", path).group(1), header, files


def private(create_request: dict) -> bool:
    """Whether a repo-creation request asks for a private repo (``visibility`` in newer huggingface_hub, ``private``
    in older)."""
    if "visibility" in create_request:
        return create_request["visibility"] == "private"
    return create_request["private"]


@pytest.fixture
def fake_hub(monkeypatch) -> FakeHub:
    """Answer ``huggingface_hub``'s HTTP client in-process: its client factory (``set_client_factory``) builds a
    client over a mock transport of its own HTTP library (httpx, or httpx2 in huggingface_hub 2)."""
    if not hasattr(_http, "set_client_factory"):
        pytest.skip("huggingface_hub < 1.0 speaks HTTP through requests; this test answers its httpx client")
    httpx = next(getattr(_http, n) for n in ("httpx2", "httpx") if hasattr(_http, n))
    fake = FakeHub()

    def handle(request):
        status, payload, headers = fake.answer(request.method, request.url.path, request.read())
        return httpx.Response(status, json=payload, headers=headers)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # one commit through create_commit, not Xet storage
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _http.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(handle), follow_redirects=True))
    yield fake
    _http.set_client_factory(_http.default_client_factory)


@needs_hub
def test_push_to_hub_commits_the_saved_files_with_the_model_card(fake_hub):
    model = small()
    info = mal.push_to_hub(model, "org/mal-micro", token="hf_test", commit_message="MAL micro", metrics={"top1": 0.5})
    assert info.commit_url.endswith(f"/org/mal-micro/commit/{COMMIT}")
    calls = [(m, p) for m, p, _ in fake_hub.requests]
    assert calls[0] == ("POST", "/api/repos/create") and calls[-1] == ("POST", "/api/models/org/mal-micro/commit/main")
    assert ("POST", "/api/models/org/mal-micro/preupload/main") in calls
    assert set(calls) <= {*calls[:1], *calls[-1:], ("POST", "/api/models/org/mal-micro/preupload/main"),
                          ("POST", "/api/validate-yaml")}  # fmt: skip
    created = json.loads(fake_hub.requests[0][2])
    assert (created.get("organization"), created["name"], private(created)) == ("org", "mal-micro", False)
    repo_id, header, files = fake_hub.commit()
    assert repo_id == "org/mal-micro" and header["summary"] == "MAL micro"
    assert sorted(files) == ["README.md", "config.json", "model.safetensors"]
    card = files["README.md"].decode()
    assert 'mal.load_model("hf-hub:org/mal-micro")' in card and "| top1 | 0.5 |" in card
    assert json.loads(files["config.json"]) == model.mal_card()


@needs_hub
def test_pushed_files_load_back_to_the_same_outputs(fake_hub, tmp_path):
    model = small()
    mal.push_to_hub(model, "org/m", token="hf_test", private=True)
    assert private(json.loads(fake_hub.requests[0][2])) is True
    _, _, files = fake_hub.commit()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(mal.load_model(tmp_path)(x), model(x))


@needs_hub
def test_a_repo_missing_on_the_hub_is_one_line_naming_it(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        mal.load_model("hf-hub:org/nowhere")
    assert str(e.value).startswith("no model repo 'org/nowhere' on the Hugging Face Hub") and "\n" not in str(e.value)


# -- the model card ------------------------------------------------------------------------------------------------


def test_the_model_card_has_front_matter_the_model_and_the_lines_that_load_it(tmp_path):
    model = small()
    folder = mal.save_model(model, tmp_path / "saved", metrics={"top1": 81.25, "epochs": 3})
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    assert yaml.safe_load(front) == {"library_name": "mal", "license": "mit",
                                     "tags": ["image-classification", "mal", "vil"]}  # fmt: skip
    params = sum(p.numel() for p in model.parameters())
    assert f"({params:,})" in body and "# mal_micro" in body
    assert "width 32, depth 2, patch size 4, image size 32 (8x8 patches), 1 input channels, 10 classes" in body
    assert f"token layout: {model.cfg.layout.describe(model.cfg.grid)}" in body
    assert "| top1 | 81.25 |" in body and "| epochs | 3 |" in body
    use = f'```python\nimport mal\nmodel = mal.load_model("{folder.as_posix()}")  # in eval mode\nout = model(x)  # '
    assert use in body
    config = body.split("```json\n", 1)[1].split("```", 1)[0]
    assert json.loads(config) == model.mal_card()["config"]
    if importlib.util.find_spec("huggingface_hub"):  # the Hub's own reading of the card
        from huggingface_hub import ModelCard

        assert ModelCard(text).data.library_name == "mal"


def test_the_model_card_of_an_encoder_is_tagged_with_its_kind(tmp_path):
    torch.manual_seed(0)
    enc = mal.create_encoder("mal_micro", dim=32, depth=2, num_heads=2)
    text = (mal.save_model(enc, tmp_path / "enc") / "README.md").read_text()
    assert yaml.safe_load(text.split("---\n")[1])["tags"] == ["encoder", "mal", "vil"]
    assert "## Metrics" not in text and "(B, L, D) tokens" in text
