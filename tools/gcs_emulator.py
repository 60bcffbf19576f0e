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
3. Uploads and deletes ignore ``ifGenerationMatch`` (real GCS answers 412 when the
   object's generation differs, ``0`` meaning "no live object"), so every conditional
   write succeeded: the gs:// workdir lock was not exclusive. A lock taken over by a
   second run, then rewritten by the first on its old generation::

     kv.write("train.lock", b"b", if_equal=gen).result()     # the new holder
     kv.write("train.lock", b"a", if_equal=gen).result()     # not refused (412 on GCS)
"""
from __future__ import annotations

import sys
import threading
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


_WRITES = threading.Lock()   # a conditional write checks and writes in one step


def _patched_write(original, name_of):
  """``original`` upload or delete, refused with 412 when ``ifGenerationMatch`` differs from
  the object's generation (``0`` for a missing one); ``name_of(request)``: the object name."""
  def write(request, response, storage, *args, **kwargs):
    from gcp_storage_emulator.exceptions import NotFound
    match = request.query.get("ifGenerationMatch")
    name = name_of(request)
    if not match or not name:
      return original(request, response, storage, *args, **kwargs)
    with _WRITES:
      try:
        generation = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
      except NotFound:
        generation = "0"
      if match[0] != generation:
        response.status = HTTPStatus.PRECONDITION_FAILED
        return None
      return original(request, response, storage, *args, **kwargs)
  return write


def _upload_name(request):
  return (request.query.get("name") or [None])[0]


def _patch(objects, server, name: str, patched) -> None:
  original = getattr(objects, name)
  setattr(objects, name, patched)
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is original:
        methods[method] = patched


def serve(port: int, bucket: str) -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  # objects.get serves ?alt=media through download
  _patch(objects, server, "download", _patched_download(objects.download))
  _patch(objects, server, "insert", _patched_write(objects.insert, _upload_name))
  _patch(objects, server, "delete", _patched_write(
      objects.delete, lambda request: request.params.get("object_id")))
  server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__":
  serve(int(sys.argv[1]), sys.argv[2])
