"""Put first on a test child's PYTHONPATH by `tests.gcs_emulator.emulator_env()`: makes gcsfs safe to use against
fake-gcs-server in every process of a test, not only the pytest one.

gcsfs's `_info` (under exists / isdir / isfile, and epath's, which orbax uses) races an object GET against a
listing and cancels the loser; after enough such cancels fake-gcs-server stops answering anyone (a plain HTTP
request then times out too: 150-400 isdir calls in a row hang it). Here the two requests run one after the other,
which gives the same answer. Applied only when STORAGE_EMULATOR_HOST is set: real Cloud Storage is untouched.
"""
import os


def make_gcsfs_info_sequential() -> None:
    try:
        import gcsfs
        from gcsfs import core
    except ImportError:
        return
    if getattr(core.GCSFileSystem._info, "_swd_sequential", False):
        return
    original = core.GCSFileSystem._info

    async def _info(self, path, generation=None, **kwargs):
        path = self._strip_protocol(path).rstrip("/")
        if "/" not in path:
            return await original(self, path, generation=generation, **kwargs)
        bucket, key, path_generation = self.split_path(path)
        generation = core._coalesce_generation(generation, path_generation)
        try:
            out = await self._get_object(path)
            if not core._is_directory_marker(out):
                return out
        except FileNotFoundError:
            pass
        return await self._get_directory_info(path, bucket, key, generation)

    _info._swd_sequential = True
    core.GCSFileSystem._info = _info
    gcsfs.GCSFileSystem.clear_instance_cache()  # the sync wrappers are bound per instance
    try:
        from etils.epath import backend
        backend.fsspec_backend._get_filesystem.cache_clear()
    except ImportError:
        pass


if os.environ.get("STORAGE_EMULATOR_HOST"):
    make_gcsfs_info_sequential()
