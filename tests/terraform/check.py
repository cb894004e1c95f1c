"""What terraform/ must say, read with python-hcl2 (terraform validate cannot run without its
registry). Run by tests/tests/terraform.rs; prints the rendered `wattbus_toml` output as JSON
for that test to check with `wattbus config check`.

Every assertion is something a user relies on: the account is hardened, the container
private, the lifecycle backstop cannot outrun the rotator, the SAS can do what backup-rotator
does and no more.
"""
import json
import sys
import textwrap
from pathlib import Path

import hcl2

root = Path(sys.argv[1])


def unquote(s):
    """python-hcl2 8 keeps a string's quotes, and a heredoc's markers and indentation."""
    if len(s) >= 2 and s[0] == '"' and s[-1] == '"':
        s = s[1:-1]
    if s.startswith("<<-EOT\n") and s.endswith("EOT"):
        s = textwrap.dedent(s[len("<<-EOT\n") : -len("EOT")]).strip("\n")
    return s


def norm(v):
    """Plain data: block labels and strings unquoted, python-hcl2's own keys (__…) dropped."""
    if isinstance(v, dict):
        return {unquote(k): norm(x) for k, x in v.items() if not k.startswith("__")}
    if isinstance(v, list):
        return [norm(x) for x in v]
    if isinstance(v, str):
        return unquote(v)
    return v


files = {p.name: norm(hcl2.load(p.open())) for p in sorted(root.glob("*.tf"))}


def one(v):
    """A block (a list of one dict) or a value."""
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], dict):
        return v[0]
    return v


def blocks(kind):
    out = {}
    for f in files.values():
        for entry in f.get(kind, []):
            for rtype, named in entry.items():
                for name, body in named.items():
                    out[(rtype, name)] = body
    return out


resources = blocks("resource")
data = blocks("data")
variables = {}
outputs = {}
for f in files.values():
    for v in f.get("variable", []):
        variables.update(v)
    for o in f.get("output", []):
        outputs.update(o)


def check(cond, what):
    if not cond:
        sys.exit(f"terraform/: {what}")


# Provider: azurerm v4.
tf = [t for f in files.values() for t in f.get("terraform", [])]
providers = {k: v for t in tf for p in t["required_providers"] for k, v in p.items()}
check(providers.get("azurerm", {}).get("version", "").startswith("~> 4."), f"azurerm must be ~> 4.x: {providers}")

# The account, hardened.
acct = resources[("azurerm_storage_account", "this")]
want = {
    "min_tls_version": "TLS1_2",
    "https_traffic_only_enabled": True,
    "allow_nested_items_to_be_public": False,
    "infrastructure_encryption_enabled": True,
    "cross_tenant_replication_enabled": False,
}
for k, v in want.items():
    check(one(acct.get(k)) == v, f"storage account {k} = {one(acct.get(k))!r}, want {v!r}")
blob = one(acct["blob_properties"])
check(one(blob.get("versioning_enabled")) is True, "blob versioning must be on")
check("delete_retention_policy" in blob, "blob soft delete must be on")
check("container_delete_retention_policy" in blob, "container soft delete must be on")
net = one(acct["network_rules"])
check("allowed_ip_ranges" in one(net["ip_rules"]), "network rules must use allowed_ip_ranges")

# The container, private, and the only one.
containers = [b for (t, _), b in resources.items() if t == "azurerm_storage_container"]
check(len(containers) == 1, "exactly one container")
check(one(containers[0]["container_access_type"]) == "private", "the container must be private")

# The lifecycle backstop: deletes under the container only, long after the rotator would,
# and can be turned off. keep (10) x full_every_h (24 h) = 10 days is the rotator's default.
policy = resources[("azurerm_storage_management_policy", "backstop")]
rule = one(policy["rule"])
flt = one(rule["filters"])
prefixes = flt["prefix_match"]
check(prefixes == ["${azurerm_storage_container.backups.name}/"], f"the lifecycle rule must match the container only: {prefixes}")
base = one(one(rule["actions"])["base_blob"])
check(one(base["delete_after_days_since_modification_greater_than"]) == "${var.delete_after_days}", "the lifecycle rule must delete after var.delete_after_days")
days = variables["delete_after_days"]
default_days = one(days["default"])
check(default_days >= 3 * 10, f"delete_after_days defaults to {default_days}: it must be far beyond the rotator's 10 days")
cond = one(one(days["validation"])["condition"])
check(">= 14" in cond and "== 0" in cond, f"delete_after_days must refuse 1-13: {cond}")
check("var.delete_after_days > 0" in one(policy["count"]), "delete_after_days = 0 must turn the rule off")

# The SAS: the container only, HTTPS only, what backup-rotator does (list, read, write,
# create, add, delete) and nothing else.
sas = data[("azurerm_storage_account_blob_container_sas", "backups")]
check(one(sas["https_only"]) is True, "the SAS must be HTTPS only")
perms = one(sas["permissions"])
granted = sorted(k for k, v in perms.items() if not k.startswith("__") and one(v) is True)
check(granted == ["add", "create", "delete", "list", "read", "write"], f"SAS permissions {granted}")
check("sas_lifetime_days" in one(sas["expiry"]), "the SAS expiry must come from sas_lifetime_days")
check(one(outputs["sas_token"].get("sensitive")) is True, "the sas_token output must be sensitive")

# The role for a service principal: data access on the container, not the account.
role = resources[("azurerm_role_assignment", "backup_writer")]
check(one(role["scope"]) == "${azurerm_storage_container.backups.id}", "the role must be scoped to the container")
check(one(role["role_definition_name"]) == "Storage Blob Data Contributor", "the role must be Storage Blob Data Contributor")

# The config snippet it prints, with its interpolations filled in as terraform would.
toml = one(outputs["wattbus_toml"]["value"])
toml = toml.replace("${azurerm_storage_account.this.name}", "wattbusbackups1234")
toml = toml.replace("${azurerm_storage_container.backups.name}", one(variables["container_name"]["default"]))
check("${" not in toml, f"an interpolation the test does not know: {toml}")
print(json.dumps({"wattbus_toml": toml}))
