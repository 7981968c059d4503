"""`hf-hub:` weight names, the project's only network access.

  hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k            the repository's main revision
  hf-hub:timm/resmlp_12_224.fb_in1k@<branch|tag|commit>   a pinned revision

A name the user typed resolves through huggingface_hub to the repository's
`model.safetensors` (timm's layout, which weights.py converts key by key). The file is
cached as huggingface_hub caches everything: under HF_HUB_CACHE, else HF_HOME/hub, else
~/.cache/huggingface/hub; with HF_HUB_OFFLINE=1 it is read from that cache and nothing
is fetched. No other code here touches the network.
"""

import os
from typing import Tuple

PREFIX = "hf-hub:"
FILENAME = "model.safetensors"


def is_hub_name(name) -> bool:
  return isinstance(name, str) and name.startswith(PREFIX)


def parse(name: str) -> Tuple[str, str]:
  """'hf-hub:org/repo[@revision]' -> (repo id, revision or "main")."""
  repo, _, revision = name[len(PREFIX):].strip().partition("@")
  parts = repo.split("/")
  if len(parts) != 2 or not all(parts) or (_ and not revision):
    raise ValueError(f"{name!r} is not a hub name; write hf-hub:ORG/REPO or "
                     "hf-hub:ORG/REPO@REVISION, e.g. hf-hub:timm/mixer_b16_224.goog_in21k_ft_in1k.")
  return repo, revision or "main"


def _by_hand(repo: str, revision: str) -> str:
  rev = f" --revision {revision}" if revision != "main" else ""
  return (f"download it by hand (`hf download {repo} {FILENAME}{rev}`, or from "
          f"https://huggingface.co/{repo}) and pass the file's path instead")


def download(name: str) -> str:
  """The local path of `name`'s model.safetensors, fetched into the cache if need be.

  ValueError with one sentence naming the repository when it cannot be had: not
  cached while offline, no network, no such repository, revision or file.
  """
  # Imported here: only a typed hf-hub: name needs the client.
  from huggingface_hub import constants, errors, hf_hub_download
  repo, revision = parse(name)
  try:
    return hf_hub_download(repo, FILENAME, revision=revision)
  except errors.LocalEntryNotFoundError:
    why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
           else "the hub could not be reached")
    raise ValueError(
        f"{name}: {repo}'s {FILENAME} at revision {revision} is not in the local cache "
        f"({constants.HF_HUB_CACHE}) and {why}; connect and retry, or "
        f"{_by_hand(repo, revision)}.") from None
  except errors.RevisionNotFoundError:
    raise ValueError(f"{name}: the repository {repo} has no revision {revision!r}; name an "
                     f"existing branch, tag or commit.") from None
  except (errors.RepositoryNotFoundError, errors.GatedRepoError):
    raise ValueError(f"{name}: the hub has no public repository {repo} (or it needs a "
                     f"login); check the name, or {_by_hand(repo, revision)}.") from None
  except errors.EntryNotFoundError:
    raise ValueError(f"{name}: the repository {repo} has no {FILENAME} (it is not a timm "
                     f"weight repository); {_by_hand(repo, revision)}.") from None
  except (errors.HfHubHTTPError, OSError) as e:
    raise ValueError(f"{name}: downloading {repo}'s {FILENAME} failed ({type(e).__name__}); "
                     f"retry, or {_by_hand(repo, revision)}.") from None


def cache_entry(cache_dir: str, repo: str, data: bytes, revision: str = "main",
                commit: str = "0" * 40) -> str:
  """Writes `data` as `repo`'s model.safetensors into a hub cache laid out as
  huggingface_hub reads it offline (refs/REVISION -> snapshots/COMMIT/FILE); returns the
  file's path. For tests and air-gapped machines that copy weights in by hand."""
  root = os.path.join(cache_dir, "models--" + repo.replace("/", "--"))
  os.makedirs(os.path.join(root, "refs"), exist_ok=True)
  with open(os.path.join(root, "refs", revision), "w") as f:
    f.write(commit)
  snapshot = os.path.join(root, "snapshots", commit)
  os.makedirs(snapshot, exist_ok=True)
  path = os.path.join(snapshot, FILENAME)
  with open(path, "wb") as f:
    f.write(data)
  return path
