"""Which errors mean a full artifact store (a full filesystem or quota, an S3 quota or full backend), and which do not.
A real full store under a real run is in tests/process/test_full_store.py.
"""

from __future__ import annotations

from hpsearch.store._artifacts import S3_FULL_CODES, store_full_reason


def test_store_full_reasons() -> None:
    import errno

    from botocore.exceptions import ClientError

    assert store_full_reason(OSError(errno.ENOSPC, "No space left on device")) == "no space left"
    assert store_full_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk quota exceeded"
    assert store_full_reason(OSError(errno.EACCES, "Permission denied")) is None
    quota = ClientError({"Error": {"Code": "XMinioAdminBucketQuotaExceeded", "Message": "quota"}}, "PutObject")
    assert store_full_reason(quota) == "S3 XMinioAdminBucketQuotaExceeded"
    from boto3.exceptions import S3UploadFailedError

    wrapped = S3UploadFailedError("Failed to upload f to b/k: An error occurred (XMinioStorageFull) when calling "
                                  "the PutObject operation: Storage backend has reached its minimum free drive")
    assert store_full_reason(wrapped) == "S3 XMinioStorageFull"
    denied = ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "PutObject")
    assert store_full_reason(denied) is None
    assert "QuotaExceeded" in S3_FULL_CODES
