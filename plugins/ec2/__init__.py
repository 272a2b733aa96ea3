"""EC2 provider for governord: instances launched from an AMI, through boto3.

Needs the ``ec2`` extra (``pip install governord[ec2]``, which installs ``boto3``). boto3 is
imported only when a config uses the type (:mod:`.provider`); registering the type imports the
config models alone (:mod:`.config`), and without boto3 installed ``governord_register_providers``
raises ModuleNotFoundError naming it.

Configured as ``[providers.NAME]`` with ``type = "ec2"``::

    [providers.aws]
    type = "ec2"
    region = "eu-west-1"
    # endpoint_url = "https://ec2.eu-west-1.amazonaws.com"   # optional: a private or test endpoint
    access_key_id = "AKIA..."                                 # optional: both keys, or neither
    secret_access_key = { env = "GOVERNORD_EC2_SECRET" }      # or { file = "/etc/governord/ec2.key" }
    verify_tls = true                                         # ca_file = "/etc/governord/ec2-ca.pem"

Without ``access_key_id``/``secret_access_key`` boto3's standard credential chain is used
(``AWS_*`` environment variables, ``~/.aws`` of the daemon's user, the instance profile of the
management host), which is the better choice when governord itself runs on EC2.

A role's ``profile`` is ``{ image_id = "ami-...", instance_type = "m6i.large", subnet_id =
"subnet-...", security_group_ids = ["sg-..."], key_name = "ops", user_data = "...", tags = {
team = "paas" }, iam_instance_profile = "governord-node" }`` (``image_id`` and ``instance_type``
are required).
"""

from __future__ import annotations

from governord import hookimpl
from governord.providers import LazyProvider, ProviderRegistry


@hookimpl
def governord_register_providers(registry: ProviderRegistry) -> None:
    """Make the ``ec2`` provider type known (boto3 is imported when a config uses it)."""
    from .config import EC2Config, EC2Profile

    registry.add(LazyProvider("ec2", f"{__name__}.provider:EC2Provider", Config=EC2Config, Profile=EC2Profile,
                              requires=["boto3", "botocore"]))
