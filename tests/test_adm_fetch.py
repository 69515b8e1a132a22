"""`--teacher adm:<preset>`: fetched once from its URL (here a local file URL), checked, converted, then cached."""

import urllib.request

import pytest
import torch

from training.run.checksums import sha256_file
from training.teacher import adm, adm_fetch
from training.teacher.adm_fetch import OfficialCheckpoint, resolve_adm_name


def _files(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))  # not the lock file


@pytest.fixture
def tiny_official(tmp_path, monkeypatch):
    """A tiny guided-diffusion checkpoint published at a file:// URL as preset "tiny"; an empty cache."""
    from tests.test_adm import SMALL, _adm

    published = tmp_path / "openai" / "tiny.pt"
    published.parent.mkdir()
    torch.save(_adm(SMALL, seed=3).state_dict(), published)
    digest = sha256_file(published)
    monkeypatch.setitem(adm.PRESETS, "tiny", SMALL)
    monkeypatch.setitem(adm_fetch.OFFICIAL_CHECKPOINTS, "tiny", OfficialCheckpoint(published.as_uri(), digest))
    monkeypatch.setenv("DREAMTEACHER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return published, digest, tmp_path / "cache" / "adm"


def test_first_use_downloads_checks_and_converts_then_the_cache_is_used(tiny_official, monkeypatch):
    published, digest, cache = tiny_official
    folder = resolve_adm_name("adm:tiny")
    assert folder == str(cache / "tiny") and adm.read_adm_flags(folder) == adm.PRESETS["tiny"]
    assert _files(cache) == ["tiny"]  # the download itself was deleted

    def no_network(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert resolve_adm_name("adm:tiny") == folder
    assert resolve_adm_name(f"adm:tiny@{digest.upper()}") == folder
    with pytest.raises(ValueError, match=f"{folder} was converted from a checkpoint with SHA-256 {digest}, not "
                                         f"{'1' * 64} as adm:tiny@1{{64}} asks; delete {folder}"):
        resolve_adm_name(f"adm:tiny@{'1' * 64}")  # an explicit digest is checked against the cached conversion


def test_a_download_with_the_wrong_digest_is_refused_and_deleted(tiny_official, monkeypatch):
    published, digest, cache = tiny_official
    monkeypatch.setitem(adm_fetch.OFFICIAL_CHECKPOINTS, "tiny", OfficialCheckpoint(published.as_uri(), "0" * 64))
    with pytest.raises(ValueError, match=f"has SHA-256 {digest}, expected 0{{64}} .*the download was deleted"):
        resolve_adm_name("adm:tiny")
    assert _files(cache) == []


def test_without_a_recorded_digest_the_name_must_carry_one(tiny_official, monkeypatch):
    published, digest, cache = tiny_official
    monkeypatch.setitem(adm_fetch.OFFICIAL_CHECKPOINTS, "tiny", OfficialCheckpoint(published.as_uri(), None))
    with pytest.raises(ValueError, match=f"SHA-256 {digest}, and no official digest .* adm:tiny@<sha256>"):
        resolve_adm_name("adm:tiny")
    with pytest.raises(ValueError, match="must be a SHA-256 digest"):
        resolve_adm_name("adm:tiny@abc")
    assert resolve_adm_name(f"adm:tiny@{digest}") == str(cache / "tiny")


def test_offline_it_says_which_file_to_put_where_and_uses_it_once_there(tiny_official, monkeypatch):
    published, digest, cache = tiny_official
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected_path = cache / "tiny.pt"
    with pytest.raises(FileNotFoundError, match=f"download {published.as_uri()} to {expected_path} "
                                                f"\\(SHA-256 {digest}\\)"):
        resolve_adm_name("adm:tiny")
    cache.mkdir(parents=True, exist_ok=True)
    expected_path.write_bytes(published.read_bytes())
    assert resolve_adm_name("adm:tiny") == str(cache / "tiny")
    assert expected_path.is_file()  # a file the user put there is left in place


def test_an_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown ADM checkpoint 'adm:512x512'; known: adm:256x256_diffusion_uncond"):
        resolve_adm_name("adm:512x512")
    paper = adm_fetch.OFFICIAL_CHECKPOINTS["256x256_diffusion_uncond"]
    assert paper.url.endswith("/diffusion/jul-2021/256x256_diffusion_uncond.pt") and len(paper.sha256) == 64


def test_a_teacher_named_adm_is_built_from_the_cache(tiny_official):
    from dreamteacher_models.recipes import TeacherConfig
    from training.teacher.build import build_teacher

    config = TeacherConfig(kind="unet", source="adm:tiny", timestep=10, taps=("output_blocks.2",))
    teacher = build_teacher(config, (0.5,) * 3, (0.5,) * 3)
    assert teacher.kind == "adm" and teacher.source == str(tiny_official[2] / "tiny")


def test_a_cut_connection_is_an_error_not_a_short_file(tiny_official, monkeypatch):
    published, _, cache = tiny_official

    class Cut:  # announces the whole file, delivers 10 bytes
        headers = {"Content-Length": str(published.stat().st_size)}

        def __init__(self):
            self.data = [published.read_bytes()[:10], b""]

        def read(self, n):
            return self.data.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Cut())
    with pytest.raises(FileNotFoundError, match="stopped after 10 of"):
        resolve_adm_name("adm:tiny")
    assert _files(cache) == []


@pytest.mark.parametrize("by_hand", [False, True])
def test_a_file_of_the_wrong_size_is_refused_before_it_is_hashed(tiny_official, monkeypatch, by_hand):
    published, digest, cache = tiny_official
    size = published.stat().st_size
    monkeypatch.setitem(adm_fetch.OFFICIAL_CHECKPOINTS, "tiny",
                        OfficialCheckpoint(published.as_uri(), digest, size=size + 1))

    def never_hashed(path):
        raise AssertionError(f"{path} was hashed although its size was wrong")

    monkeypatch.setattr(adm_fetch, "sha256_file", never_hashed)
    if by_hand:  # put in the cache by hand: kept, with what to do
        cache.mkdir(parents=True)
        (cache / "tiny.pt").write_bytes(published.read_bytes())
    with pytest.raises(ValueError, match=rf"tiny\.pt has {size:,} bytes, the official file {size + 1:,}: "
                                         + ("delete it and download" if by_hand else "the download was deleted")):
        resolve_adm_name("adm:tiny")
    assert _files(cache) == (["tiny.pt"] if by_hand else [])


def test_the_papers_teacher_is_pinned_to_its_real_digest_and_size():
    official = adm_fetch.OFFICIAL_CHECKPOINTS["256x256_diffusion_uncond"]
    assert official.sha256 == "a37c32fffd316cd494cf3f35b339936debdc1576dad13fe57c42399a5dbc78b1"
    assert official.size == 2_211_383_297
    assert official.url.endswith("/diffusion/jul-2021/256x256_diffusion_uncond.pt")
