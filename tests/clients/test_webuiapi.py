"""webuiapi 0.9.17 (A1111/SD.Next client), unmodified, against arenahost's /sdapi/v1.

Client quirks found here:

* ``WebUIApi()`` calls ``/sdapi/v1/scripts`` on construction (extension
  detection) and swallows any error; arenahost answers 404 there.
* ``util_get_current_model`` indexes ``options["sd_checkpoint_hash"]`` when
  ``sd_model_checkpoint`` is absent; arenahost always sends the latter.
* webuiapi has no ``refresh_loras``; its ``custom_post`` expects a JSON
  object with images, so the refresh is posted through the client's own
  ``session`` (as other clients post it) and must answer 200.
* ``txt2img`` always sends ``sampler_name="Euler a"`` and ``cfg_scale=7``
  unless told otherwise, so arenahost reports the sampler as ignored in
  ``info["warnings"]`` (and refuses it in strict mode).
"""

from __future__ import annotations

import threading

import pytest
import webuiapi

from conftest import wait_until


@pytest.fixture(scope="module")
def api(host):
    return webuiapi.WebUIApi(host="127.0.0.1", port=host.port, sampler="Euler", steps=8)


def run_in_thread(fn, **kw):
    out = {}

    def target():
        try:
            out["result"] = fn(**kw)
        except Exception as e:  # noqa: BLE001 - reported by the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def test_lists_models_samplers_loras_and_memory(api, host):
    assert api.util_get_model_names() == ["flux-sample-nf4.safetensors", "second-nf4.safetensors"]
    m = api.get_sd_models()[0]
    assert set(m) >= {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert api.util_get_current_model() == "flux-sample-nf4.safetensors"
    assert "Euler" in api.util_get_sampler_names()
    assert api.util_get_scheduler_names()
    assert api.session.post(f"{api.baseurl}/refresh-loras").status_code == 200
    assert api.refresh_checkpoints() is None  # A1111 answers null
    loras = {l["name"]: l for l in api.get_loras()}
    assert {"flux-sample-kohya-lora", "flux-sample-peft-lora", "deep-style"} <= set(loras)
    assert loras["deep-style"]["path"].endswith("styles/deep-style.safetensors")
    assert set(loras["deep-style"]) >= {"name", "alias", "path", "metadata"}
    mem = api.get_memory()
    assert mem["ram"]["total"] > 0 and mem["cuda"]["system"]["total"] > 0


def test_options_keep_unknown_keys_and_select_the_checkpoint(api):
    api.set_options({"my_extension_setting": {"a": [1, 2]}, "samples_format": "jpg"})
    opts = api.get_options()
    assert opts["my_extension_setting"] == {"a": [1, 2]} and opts["samples_format"] == "jpg"
    # util_set_model lower-cases the name and picks the closest title; the
    # second checkpoint is loaded into the arena then, and txt2img runs on it.
    api.util_set_model("Second-NF4")
    assert api.util_get_current_model() == "second-nf4.safetensors"
    r = api.txt2img(prompt="a cat", steps=2, width=64, height=64)
    assert r.info["sd_model_name"] == "second-nf4"
    api.util_set_model("FLUX-sample-nf4")
    assert api.get_options()["sd_model_checkpoint"] == "flux-sample-nf4.safetensors"
    assert api.txt2img(prompt="a cat", steps=2, width=64, height=64).info["sd_model_name"] == "sample"


def test_txt2img_with_lora_tags_progress_and_batches(api, host):
    t, out = run_in_thread(api.txt2img, prompt="a cat <lora:flux-sample-kohya-lora:0.8> <lora:deep-style:0.3> <lora:nope:1>",
                           steps=60, width=256, height=256, batch_size=2, seed=11)
    seen = []

    def progressed():
        p = api.get_progress()
        if p["state"]["sampling_step"] > 0 and p["state"]["job_count"] == 1:
            seen.append(p)
        return len(seen) >= 2 and seen[-1]["current_image"]

    wait_until(progressed, timeout=120, what="progress with a current_image")
    t.join(300)
    assert "error" not in out, out.get("error")
    r = out["result"]
    assert len(r.images) == 2 and all(im.size == (256, 256) for im in r.images)
    assert 0 < seen[0]["progress"] <= 1
    info = r.info
    assert info["all_seeds"] == [11, 12]
    assert sorted(l["name"] for l in info["loras"]) == ["flux-sample-kohya-lora", "styles/deep-style"]
    assert any("<lora:nope>" in w for w in info["warnings"]), info["warnings"]
    assert not info["interrupted"]
    assert "<lora" not in info["prompt"]


def test_size_is_rounded_and_reported(api):
    r = api.txt2img(prompt="a cat", steps=2, width=500, height=256)
    assert r.images[0].size == (496, 256)
    assert any("rounded to 496×256" in w for w in r.info["warnings"])


def running_job(api, after=None):
    """The id of the job sampling now (past step 3), when it is not `after`."""
    p = api.get_progress()
    st = p["state"]
    if st["job_count"] == 1 and st["sampling_step"] > 3 and st["job"] != after:
        return st["job"]
    return None


def test_interrupt_returns_the_images_done_so_far(api):
    t, out = run_in_thread(api.txt2img, prompt="a cat", steps=40, width=512, height=512, n_iter=3, seed=1)
    first = wait_until(lambda: running_job(api), timeout=120, what="the first image to sample")
    wait_until(lambda: running_job(api, after=first), timeout=120, what="the second image to sample")
    assert api.interrupt() == {}
    t.join(120)
    assert "error" not in out, out.get("error")
    r = out["result"]
    assert r.info["interrupted"] is True
    # One finished image, then the interrupted one's newest preview (as
    # A1111 decodes the latent it stopped at); the third never started.
    assert len(r.images) == 2 and r.info["partial_image"] == 1, r.info
    assert all(im.size == (512, 512) for im in r.images)
    assert "Interrupted at step" in r.info["infotexts"][1]
    assert any(w.startswith("interrupted: 2 of 3") for w in r.info["warnings"])


def test_skip_drops_only_the_current_image(api):
    t, out = run_in_thread(api.txt2img, prompt="a cat", steps=400, width=256, height=256, batch_size=2)
    wait_until(lambda: running_job(api), timeout=120, what="sampling to start")
    assert api.skip() == {}
    t.join(300)
    assert "error" not in out, out.get("error")
    r = out["result"]
    assert r.info["skipped"] == 1 and not r.info["interrupted"] and len(r.images) == 1


def test_strict_mode_refuses_what_would_be_ignored(api):
    api.set_options({"arenahost_strict": True})
    try:
        with pytest.raises(RuntimeError) as e:
            api.txt2img(prompt="a cat <lora:nope:1>", steps=2, width=64, height=64, sampler_name="Euler a")
        assert e.value.args[0] == 400 and "nope" in e.value.args[1] and "Euler a" in e.value.args[1]
        r = api.txt2img(prompt="a cat", steps=2, width=64, height=64, sampler_name="Euler")
        assert len(r.images) == 1 and r.info["warnings"] == []
    finally:
        api.set_options({"arenahost_strict": False})
