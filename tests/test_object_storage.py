"""Everything the package reads or writes, on gs:// and s3:// (local emulators, see storage_emulators):
JSON, files and folders (atomic: a folder being written is refused by readers), link pointers, LoRA
safetensors, image folders and ArrayRecord shards; errors for a missing bucket, missing credentials and
a permission failure; and (slow) the toy trainer into gs://bucket/run, SIGTERM'd and resumed, and sampled
with mmdit-sample --model=gs://bucket/run --out=gs://bucket/samples."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from mmdit_jax.errors import MMDiTError
from mmdit_jax.io import files, paths
from storage_emulators import BUCKET, ROOT, free_port, gcs_emulator, s3_emulator


@pytest.fixture(scope="module")
def stores():
    """Both emulators, and this process's environment pointing at them (restored afterwards)."""
    with gcs_emulator() as gcs_env, s3_emulator() as s3_env:
        env = {**gcs_env, **s3_env, "TENSORSTORE_GCS_HTTP_URL": gcs_env["STORAGE_EMULATOR_HOST"],
               "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "AWS_EC2_METADATA_DISABLED": "true"}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        _clear_fs_caches()
        try:
            yield env
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _clear_fs_caches()


def _clear_fs_caches():
    """Clients made afresh, reading the endpoint and keys now in the environment (epath keeps one
    filesystem per scheme, fsspec one per set of arguments)."""
    import gcsfs
    import s3fs
    from etils.epath import backend

    type(backend.fsspec_backend)._get_filesystem.cache_clear()
    gcsfs.GCSFileSystem.clear_instance_cache()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_files_folders_links_and_lora(stores, scheme, tmp_path, monkeypatch):
    from mmdit_jax.io.safetensors_io import TensorFile, save_file

    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    url = f"{scheme}://{BUCKET}/t"
    files.write_json(paths.join(url, "a.json"), {"x": [1, 2]})
    assert paths.read_json(paths.join(url, "a.json")) == {"x": [1, 2]}

    with files.atomic_folder(paths.join(url, "base")) as tmp:  # a pipeline-like folder, uploaded whole
        os.makedirs(os.path.join(tmp, "vae"))
        with open(os.path.join(tmp, "vae", "config.json"), "w") as f:
            json.dump({"c": 1}, f)
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump({"vae": ["diffusers", "X"]}, f)
    assert paths.listdir(paths.join(url, "base")) == ["model_index.json", "vae"]  # no writing marker left

    # a link in a bucket folder is a pointer file, relative inside the folder's root
    files.link(paths.join(url, "base", "vae"), paths.join(url, "run", "vae"), url)
    assert paths.read_json(paths.join(url, "run", "vae" + paths.LINK_SUFFIX)) == {"target": "../base/vae"}
    files.write_json(paths.join(url, "run", "model_index.json"), {"vae": ["diffusers", "X"]})
    local = paths.local_folder(paths.join(url, "run"))  # the copy follows the pointer
    with open(os.path.join(local, "vae", "config.json")) as f:
        assert json.load(f) == {"c": 1}

    # LoRA-sized safetensors: written through a local file, one object; read back exactly
    tensors = {"a.lora_A.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, np.float16)}
    save_file(tensors, paths.join(url, "lora", "w.safetensors"), {"format": "pt"})
    back = TensorFile(paths.join(url, "lora", "w.safetensors"))
    assert sorted(back) == sorted(tensors) and all(np.array_equal(back[k], v) for k, v in tensors.items())

    # a folder whose writer died (the marker is still there) is refused, naming it
    files.write_json(paths.join(url, "dead", "config.json"), {})
    files.write_json(paths.join(url, "dead", paths.WRITING_MARKER), {})
    with pytest.raises(MMDiTError, match=rf"{scheme}://{BUCKET}/t/dead: incomplete"):
        paths.local_folder(paths.join(url, "dead"))


def test_image_folder_and_arrayrecord_shards(stores, tmp_path, monkeypatch):
    from mmdit_jax.data.arrayrecord import RecordSet, RecordWriter, decode_record, open_source
    from mmdit_jax.data.folder import read_caption, read_image, scan_folder

    monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "cache"))
    local = tmp_path / "imgs"
    (local / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a", "sub/b"):
        Image.fromarray(rng.integers(0, 255, (6, 10, 3), dtype=np.uint8)).save(local / f"{name}.png")
    (local / "a.txt").write_text("a red square\n")
    files.copy_tree(local, "gs://bucket/imgs")
    here, there = scan_folder(str(local)), scan_folder("gs://bucket/imgs")
    assert [(i.key, i.height, i.width) for i in there.items] == [(i.key, i.height, i.width) for i in here.items]
    assert there.uncaptioned == 1
    for a, b in zip(here.items, there.items):
        assert np.array_equal(np.asarray(read_image(a)), np.asarray(read_image(b)))
        assert read_caption(a) == read_caption(b)

    w = RecordWriter("s3://bucket/records")  # precompute output straight into a bucket
    for i in range(3):
        w.add((16, 16), f"k{i}", f"c{i}", np.full((4, 2, 2), i, np.float32), np.zeros((5, 8), np.float32),
              np.zeros(8, np.float32))
    w.commit({"text_layout": []}, (np.zeros((5, 8)), np.zeros(8)))
    rs = RecordSet("s3://bucket/records")
    (pixels, shape, file, count), = rs.buckets
    assert (pixels, shape, count) == ((16, 16), (4, 2, 2), 3) and file.startswith("s3://bucket/records/")
    src = open_source(file)
    assert [decode_record(src[i])["key"] for i in range(3)] == ["k0", "k1", "k2"]


def test_one_line_errors(stores, monkeypatch):
    for url in ("gs://no-such-bucket/run", "s3://no-such-bucket/run"):
        with pytest.raises(MMDiTError, match=rf"--workdir: {url}: bucket 'no-such-bucket' does not exist"):
            paths.check_bucket(url, "--workdir")
    # no credentials at all (S3: nothing in the environment or the usual files)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    _clear_fs_caches()
    with pytest.raises(MMDiTError) as e:
        paths.check_bucket("s3://bucket/run", "--model")
    assert str(e.value).startswith("--model: s3://bucket/run: no usable credentials") and "\n" not in str(e.value)
    _clear_fs_caches()


def test_permission_denied(stores, monkeypatch):
    """moto enforcing IAM: a user without any policy is refused; the message names the URL."""
    import boto3

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="locked")
        iam = boto3.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        _clear_fs_caches()
        with pytest.raises(MMDiTError) as e:
            files.write_json("s3://locked/run/a.json", {})
        assert str(e.value).startswith("s3://locked/run/a.json") and "permission denied" in str(e.value)
    finally:
        proc.kill()
        proc.wait()
        _clear_fs_caches()


def _cli(module, *args, env):
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)


@pytest.mark.slow
def test_toy_train_kill_resume_sample_convert_on_gcs(stores, tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MMDIT_CACHE=str(tmp_path / "cache"))
    run = "gs://bucket/run"
    args = [f"--workdir={run}", "--config=toy", "--set=max_steps=5", "--set=batch_size=2", "--set=log.every=1",
            "--set=checkpoint.every=100", "--set=eval.kind=none"]
    first = _cli("mmdit_jax.cli.train", *args, env=env)
    lines = []
    for line in first.stdout:  # stopped once it trains: SIGTERM saves the step and exits 143
        lines.append(line)
        if line.startswith("step 1/5"):
            first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=900) == 143, "".join(lines)[-3000:]
    out = "".join(lines)
    saved = int(out.split("preempted: saved step ")[1].split(";")[0])
    second = subprocess.run([sys.executable, "-m", "mmdit_jax.cli.train", *args], env=env, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-3000:]
    assert f"resumed from step {saved} (gs://bucket/run/checkpoints)" in second.stdout
    rows = [json.loads(x) for x in paths.read_text(f"{run}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]  # the log reads as one run
    assert paths.read_json(f"{run}/vae{paths.LINK_SUFFIX}") == {"target": "base/vae"}

    sample = subprocess.run([sys.executable, "-m", "mmdit_jax.cli.sample", f"--model={run}", "--prompt=a red square",
                             "--steps=2", "--out=gs://bucket/samples"], env=env, capture_output=True, text=True,
                            timeout=900)
    assert sample.returncode == 0, sample.stdout[-2000:] + sample.stderr[-3000:]
    png = sample.stdout.split("wrote ")[1].split()[0]
    assert png.startswith("gs://bucket/samples/")
    with paths.open(png, "rb") as f:
        assert Image.open(f).size[0] > 0
