"""Get a user's access token from tokend and follow its refreshes.

The gRPC code is generated from proto/tokend/v1/tokend.proto at run time into a
temporary directory, so the example always matches the proto it runs against.

    python tokend_client.py --user-id alice --tokens 2

Settings come from the same variables as tokend's CLI: TOKEND_GRPC_ADDR,
TOKEND_API_KEY (sent as `authorization: Bearer KEY`) and, for TLS, TOKEND_CA_FILE,
TOKEND_CLIENT_CERT_FILE and TOKEND_CLIENT_KEY_FILE. Tokens are printed only as
SHA-256 fingerprints, because this output may end up in logs.
"""

import argparse
import hashlib
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_tools import protoc

REPOSITORY = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPOSITORY / "proto"
PROTO_FILE = "tokend/v1/tokend.proto"


def generate_modules(out_dir):
    """Compile the proto into out_dir and import the message and service modules."""
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE} with status {status}")
    sys.path.insert(0, str(out_dir))
    messages = importlib.import_module("tokend.v1.tokend_pb2")
    services = importlib.import_module("tokend.v1.tokend_pb2_grpc")
    return messages, services


def fingerprint(token):
    """Return the first 12 hex digits of the token's SHA-256, safe to print."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def open_channel(addr):
    """Open a plaintext or TLS channel, as the TOKEND_* TLS variables select."""
    ca_file = os.environ.get("TOKEND_CA_FILE")
    if not ca_file:
        return grpc.insecure_channel(addr)
    cert_file = os.environ.get("TOKEND_CLIENT_CERT_FILE")
    key_file = os.environ.get("TOKEND_CLIENT_KEY_FILE")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
    return grpc.secure_channel(addr, credentials)


def call_metadata():
    key = os.environ.get("TOKEND_API_KEY")
    return [("authorization", f"Bearer {key}")] if key else []


def follow(stub, messages, user_id, expected, timeout):
    """Print the current token's fingerprint, then each new one from WatchAccessToken.

    Returns the distinct fingerprints seen, stopping after `expected` of them or when
    `timeout` seconds have passed.
    """
    metadata = call_metadata()
    token = stub.GetAccessToken(
        messages.GetAccessTokenRequest(user_id=user_id), metadata=metadata, timeout=30
    )
    seen = [fingerprint(token.access_token)]
    print(f"token {seen[0]} expires {token.expires_at.ToJsonString()}", flush=True)

    deadline = time.monotonic() + timeout
    stream = stub.WatchAccessToken(
        messages.WatchAccessTokenRequest(user_id=user_id),
        metadata=metadata,
        timeout=timeout,
    )
    try:
        for event in stream:
            kind = event.WhichOneof("event")
            if kind == "status_change":
                status = messages.TokenStatus.Name(event.status_change.status)
                print(f"status {status}: {event.status_change.reason}", flush=True)
                continue
            if kind != "access_token":
                continue
            current = fingerprint(event.access_token.access_token)
            if current not in seen:
                seen.append(current)
                expires = event.access_token.expires_at.ToJsonString()
                print(f"token {current} expires {expires}", flush=True)
            if len(seen) >= expected or time.monotonic() > deadline:
                break
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        stream.cancel()
    return seen


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--user-id", required=True, help="the user's id in the calling service")
    parser.add_argument(
        "--addr",
        default=os.environ.get("TOKEND_GRPC_ADDR", "127.0.0.1:50051"),
        help="tokend's gRPC address (default: TOKEND_GRPC_ADDR or 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        default=2,
        help="exit successfully after this many distinct tokens (default 2)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120,
        help="seconds to wait for them before failing (default 120)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tokend-python-") as out_dir:
        messages, services = generate_modules(out_dir)
        with open_channel(args.addr) as channel:
            stub = services.TokenServiceStub(channel)
            try:
                seen = follow(stub, messages, args.user_id, args.tokens, args.timeout)
            except grpc.RpcError as error:
                print(f"error: tokend at {args.addr} returned {error.code().name}: "
                      f"{error.details()}", file=sys.stderr)
                return 1
    if len(seen) < args.tokens:
        print(f"error: saw {len(seen)} distinct token(s) in {args.timeout} s, "
              f"expected {args.tokens}", file=sys.stderr)
        return 1
    print(f"saw {len(seen)} distinct tokens", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
