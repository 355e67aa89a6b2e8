"""The warning printed before a CUDA AOTI package loads: it names the C++ runtime the process maps, so a user
whose process segfaults there (torch 2.11.0+cu130's image, docs/COMPILER.md) has the fix in the last line."""
from dlc.runtime.runners.artifacts import aoti_cuda_preload_hint

MAPS = ("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/libpython3.12.so\n"
        "7f10-7f11 r-xp 00000000 08:01 2 /opt/env/lib/libstdc++.so.6.0.33\n")


def test_hint_names_the_mapped_cxx_runtime(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    hint = aoti_cuda_preload_hint(str(maps), env={})
    assert hint is not None and hint.endswith("LD_PRELOAD=/opt/env/lib/libstdc++.so.6.0.33")


def test_no_hint_when_preloaded_or_nothing_mapped(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    assert aoti_cuda_preload_hint(str(maps), env={"LD_PRELOAD": "/usr/lib/libstdc++.so.6"}) is None
    maps.write_text(MAPS.splitlines()[0] + "\n")
    assert aoti_cuda_preload_hint(str(maps), env={}) is None
    assert aoti_cuda_preload_hint(str(tmp_path / "absent"), env={}) is None
