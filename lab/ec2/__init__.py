"""moto's server as the EC2 lab peer.

moto 5.x runs in its own venv (``lab/.build/ec2-venv``, made by ``install.sh``) so that its
pinned dependencies never mix with governord's. The test process talks to it only over HTTP,
with the project's own boto3.

- :func:`install_moto` runs ``install.sh`` (idempotent; fast once installed) and returns the path
  of ``moto_server``,
- :func:`start_moto` runs one ``moto_server`` on a free port of 127.0.0.1 with AMI and
  instance-type validation switched on (``InvalidAMIID.NotFound``, ``InvalidParameterValue`` as
  EC2 answers them); every process has its own state,
- :func:`prepare_lab` gives a region of a running moto what governord's lab config expects: an
  AMI id from moto's catalogue, a VPC with a subnet, a security group and a key pair,
- :func:`reset_moto` empties a running moto (``POST /moto-api/reset``).

Fidelity gaps of moto 5.2.5 that matter to governord (checked against the running server):
``ClientToken`` is stored and reported but not honoured (a second ``RunInstances`` with the same
token makes a second instance), instances are ``running`` at the first ``DescribeInstances``
(never a visible ``pending`` phase, never eventually consistent), ``terminate`` is immediate,
``KeyName`` and ``IamInstanceProfile`` names are not checked, the ``client-token`` filter is a
500, and any credentials are accepted unless ``INITIAL_NO_AUTH_ACTION_COUNT`` switches moto's
IAM authentication on (``auth_after`` of :func:`start_moto`).
"""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.process import PeerProcess, start_peer

HERE = Path(__file__).resolve().parent
BUILD_DIR = HERE.parent / ".build"
VENV = BUILD_DIR / "ec2-venv"
MOTO_SERVER = VENV / "bin" / "moto_server"

#: region the lab uses unless told otherwise
REGION = "us-east-1"
#: moto accepts any credentials (unless authentication is on); these make the signature valid
ACCESS_KEY_ID = "AKIAGOVERNORDLAB0000"
SECRET_ACCESS_KEY = "governord-lab-secret-key"
#: AMI names looked for in moto's catalogue, best first (a RHEL or an Amazon Linux 2, x86_64)
AMI_NAME_PATTERNS = ("RHEL-*x86_64*", "amzn2-ami-hvm-*x86_64-gp2")
LAB_NAME = "governord-lab"


def install_moto(*, timeout: float = 900.0) -> Path:
    """Run ``install.sh`` (a no-op when the venv is current) and return moto_server's path."""
    result = subprocess.run(
        ["sh", str(HERE / "install.sh")], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0 or not MOTO_SERVER.exists():
        raise RuntimeError(f"installing moto failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return MOTO_SERVER


def start_moto(
    workdir: Path | None = None,
    *,
    moto_server: Path | None = None,
    auth_after: int | None = None,
    timeout: float = 30.0,
) -> PeerProcess:
    """Start one moto_server on a free port of 127.0.0.1 and return it once it accepts requests.

    ``workdir`` receives ``moto.log`` (its werkzeug request log and tracebacks). With
    ``auth_after=N`` moto authenticates every request after the first N against its own IAM
    (unknown keys then get ``AuthFailure``): create the IAM user and its keys in those N.
    """
    server = moto_server or MOTO_SERVER
    if not server.exists():
        raise RuntimeError(f"{server} missing: run lab/ec2/install.sh")
    env = {
        "MOTO_ENABLE_AMI_VALIDATION": "true",
        "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true",
        # moto must never look for real AWS credentials or regions of the user running it
        "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "AWS_DEFAULT_REGION": REGION,
    }
    if auth_after is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(auth_after)
    log_path = None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / "moto.log"
    process, _ = start_peer(
        "moto",
        [sys.executable, str(HERE / "launch.py"), str(server), "127.0.0.1"],
        env=env,
        log_path=log_path,
        timeout=timeout,
    )
    return process


def reset_moto(endpoint: str, *, timeout: float = 10.0) -> None:
    """Forget every resource of every region (moto's ``/moto-api/reset``)."""
    request = urllib.request.Request(f"{endpoint.rstrip('/')}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - a loopback URL
        response.read()


def client(endpoint: str, region: str = REGION, service: str = "ec2", **kwargs: Any) -> Any:
    """A boto3 client (EC2 unless told) of moto at ``endpoint``, with the lab's keys unless
    others are given."""
    import boto3

    settings: dict[str, Any] = {
        "region_name": region,
        "endpoint_url": endpoint,
        "aws_access_key_id": ACCESS_KEY_ID,
        "aws_secret_access_key": SECRET_ACCESS_KEY,
    }
    settings.update(kwargs)
    return boto3.session.Session().client(service, **settings)


@dataclass(frozen=True)
class LabResources:
    """What :func:`prepare_lab` made (or found) in one region of a moto."""

    region: str
    image_id: str
    image_name: str
    vpc_id: str
    subnet_id: str
    subnet_cidr: str
    security_group_id: str
    key_name: str


def _find_image(ec2: Any) -> tuple[str, str]:
    for pattern in AMI_NAME_PATTERNS:
        images = ec2.describe_images(
            Owners=["amazon"],
            Filters=[{"Name": "name", "Values": [pattern]}, {"Name": "architecture", "Values": ["x86_64"]}],
        )["Images"]
        if images:
            image = sorted(images, key=lambda i: i.get("Name", ""))[-1]
            return image["ImageId"], image.get("Name", "")
    raise RuntimeError(f"moto's AMI catalogue has no image named like {AMI_NAME_PATTERNS}")


def _tagged(resource_type: str) -> list[dict[str, Any]]:
    return [{"ResourceType": resource_type, "Tags": [{"Key": "Name", "Value": LAB_NAME}]}]


def prepare_lab(endpoint: str, region: str = REGION, *, cidr: str = "10.77.0.0/16") -> LabResources:
    """Give ``region`` of the moto at ``endpoint`` an AMI id, a VPC, subnet, security group and
    key pair for governord; calling it again for the same region finds what it made before."""
    ec2 = client(endpoint, region)
    image_id, image_name = _find_image(ec2)
    named = [{"Name": "tag:Name", "Values": [LAB_NAME]}]
    vpcs = ec2.describe_vpcs(Filters=named)["Vpcs"]
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
    else:
        vpc_id = ec2.create_vpc(CidrBlock=cidr, TagSpecifications=_tagged("vpc"))["Vpc"]["VpcId"]
    subnets = ec2.describe_subnets(Filters=[*named, {"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
    if subnets:
        subnet = subnets[0]
    else:
        subnet_cidr = cidr.replace(".0.0/16", ".1.0/24")
        subnet = ec2.create_subnet(
            VpcId=vpc_id,
            CidrBlock=subnet_cidr,
            AvailabilityZone=f"{region}a",
            TagSpecifications=_tagged("subnet"),
        )["Subnet"]
    groups = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [LAB_NAME]}, {"Name": "vpc-id", "Values": [vpc_id]}]
    )["SecurityGroups"]
    if groups:
        group_id = groups[0]["GroupId"]
    else:
        group_id = ec2.create_security_group(
            GroupName=LAB_NAME, Description="governord lab hosts", VpcId=vpc_id
        )["GroupId"]
        ec2.authorize_security_group_ingress(
            GroupId=group_id,
            IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": cidr}]}],
        )
    if not ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [LAB_NAME]}])["KeyPairs"]:
        ec2.create_key_pair(KeyName=LAB_NAME)
    return LabResources(
        region=region,
        image_id=image_id,
        image_name=image_name,
        vpc_id=vpc_id,
        subnet_id=subnet["SubnetId"],
        subnet_cidr=subnet["CidrBlock"],
        security_group_id=group_id,
        key_name=LAB_NAME,
    )
