import shutil
import subprocess

import pytest

from tests.support.fake_freeswitch import FakeFreeSwitch
from tests.support.service import ESL_PASSWORD, ServiceProcess, base_env
from tests.support.zammad_standin import ZammadStandIn


@pytest.fixture
def fake_fs():
    with FakeFreeSwitch(password=ESL_PASSWORD) as fs:
        yield fs


@pytest.fixture
def zammad():
    with ZammadStandIn(token="tok-4f9c2e81b7") as server:
        yield server


@pytest.fixture
def start_service(tmp_path, fake_fs, zammad):
    """start_service(**env) -> a running fs-zammad, subscribed to the fake FreeSWITCH."""
    started = []

    def start(*args, wait=True, **env):
        before = fake_fs.connections_total
        service = ServiceProcess(base_env(fake_fs, zammad, tmp_path / "state", **env), *args)
        started.append(service)
        if wait:
            fake_fs.wait_for_subscription(after=before, timeout=15)
        return service

    yield start
    for service in started:
        if service.proc.poll() is None:
            service.stop()
        service.assert_no_secrets(ESL_PASSWORD, zammad.token)


@pytest.fixture(scope="session")
def self_signed(tmp_path_factory):
    """(cert, key) files of a certificate no CA vouches for (made with openssl, offline)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=30)
    return cert, key
