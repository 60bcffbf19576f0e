"""A local GCS emulator for the tests: gcp-storage-emulator, in memory, on 127.0.0.1.

``python tools/gcs_emulator.py PORT BUCKET`` serves until killed. Two faults of
the emulator are worked around here (and only here):

1. Media downloads carry no ``x-goog-generation`` header (real GCS always sends
   it), so tensorstore reads an object's generation as empty and a conditional
   write on it fails. Minimal repro against the unpatched emulator::

     kv = tensorstore.KvStore.open({"driver": "gcs", "bucket": "b"}).result()
     kv.write("k", b"v").result()
     gen = kv.read("k").result().stamp.generation      # b"\\0" * 9, not the real one
     kv.write("k", b"w", if_equal=gen).result()         # ValueError: Malformed StorageGeneration

   Orbax's OCDBT store reads ``manifest.ocdbt`` back and rewrites it on that
   condition, which is how a training checkpoint on ``gs://`` failed.
2. Downloads ignore ``ifGenerationMatch`` / ``ifGenerationNotMatch`` (real GCS
   answers 412 / 304).
"""
from __future__ import annotations

import sys
from http import HTTPStatus


def _patched_download(original):
  def download(request, response, storage, *args, **kwargs):
    from gcp_storage_emulator.exceptions import NotFound
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except NotFound:
      return original(request, response, storage, *args, **kwargs)
    generation = str(obj["generation"])
    match = request.query.get("ifGenerationMatch")
    not_match = request.query.get("ifGenerationNotMatch")
    response["x-goog-generation"] = generation
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    if match and match[0] != generation:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return None
    if not_match and not_match[0] == generation:
      response.status = HTTPStatus.NOT_MODIFIED
      return None
    return original(request, response, storage, *args, **kwargs)
  return download


def serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  patched = _patched_download(objects.download)
  objects.download = patched              # objects.get serves ?alt=media through it
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is objects.download:
        methods[method] = patched
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2])
