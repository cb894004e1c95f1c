"""A few Blob service REST calls for the tests, signed with the emulator's shared key (Python's
standard library only): what object_store cannot do (create a container) and what the tests
do behind the rotator's back (an unfinished set left by a crash, listing what is stored).

    blob.py ENDPOINT ACCOUNT KEYFILE mkcontainer CONTAINER
    blob.py ENDPOINT ACCOUNT KEYFILE put CONTAINER NAME FILE
    blob.py ENDPOINT ACCOUNT KEYFILE list CONTAINER        one blob name per line
    blob.py ENDPOINT ACCOUNT KEYFILE sas CONTAINER         a container SAS (racwdl, a day)

ENDPOINT is the account's URL as the rotator is configured with it
(http://127.0.0.1:PORT/devstoreaccount1).
"""
import base64
import datetime
import hashlib
import hmac
import sys
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from email.utils import formatdate

VERSION = "2021-08-06"
endpoint, account, keyfile, command, container = sys.argv[1:6]
key = base64.b64decode(open(keyfile).read().strip())


def sign(text):
    return base64.b64encode(hmac.new(key, text.encode(), hashlib.sha256).digest()).decode()


def call(method, path, query, body=b"", headers=None):
    headers = dict(headers or {})
    if method == "PUT":
        # urllib would add a form Content-Type to any body, which the signature must include.
        headers["Content-Type"] = "application/octet-stream"
    headers["x-ms-date"] = formatdate(usegmt=True)
    headers["x-ms-version"] = VERSION
    url_path = urllib.parse.urlparse(endpoint).path.rstrip("/") + "/" + urllib.parse.quote(path)
    canonical_headers = "".join(f"{k}:{headers[k]}\n" for k in sorted(headers) if k.startswith("x-ms-"))
    resource = f"/{account}{url_path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
    length = str(len(body)) if body else ""
    ctype = headers.get("Content-Type", "")
    sts = f"{method}\n\n\n{length}\n\n{ctype}\n\n\n\n\n\n\n{canonical_headers}{resource}"
    headers["Authorization"] = f"SharedKey {account}:{sign(sts)}"
    url = endpoint.rstrip("/") + "/" + urllib.parse.quote(path) + ("?" + urllib.parse.urlencode(query) if query else "")
    req = urllib.request.Request(url, data=body if method == "PUT" else None, method=method, headers=headers)
    with urllib.request.urlopen(req) as r:
        return r.read()


if command == "mkcontainer":
    call("PUT", container, {"restype": "container"})
elif command == "put":
    name, file = sys.argv[6:8]
    data = open(file, "rb").read()
    call("PUT", f"{container}/{name}", {}, data, {"x-ms-blob-type": "BlockBlob"})
elif command == "list":
    marker = ""
    while True:
        q = {"restype": "container", "comp": "list"}
        if marker:
            q["marker"] = marker
        root = ET.fromstring(call("GET", container, q))
        for b in root.iter("Blob"):
            print(b.find("Name").text)
        marker = root.findtext("NextMarker") or ""
        if not marker:
            break
elif command == "sas":
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    start = (now - datetime.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    expiry = (now + datetime.timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    perms = "racwdl"
    resource = f"/blob/{account}/{container}"
    # Service SAS, version 2020-12-06 and later: the fields in this order.
    sts = "\n".join([perms, start, expiry, resource, "", "", "https,http", VERSION, "c", "", "", "", "", "", "", ""])
    q = {"sv": VERSION, "sr": "c", "sp": perms, "st": start, "se": expiry, "spr": "https,http", "sig": sign(sts)}
    print("?" + urllib.parse.urlencode(q))
else:
    sys.exit(f"unknown command {command}")
