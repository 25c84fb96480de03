"""huggingface_hub's side of the hub tests (tests/hub.rs): fill a cache with `hf_hub_download`
and read one with `scan_cache_dir`, against the loopback hub the test starts.

    python3 tests/hub_cache.py download CACHE_DIR TYPE REPO_ID FILE...   (HF_ENDPOINT set)
    python3 tests/hub_cache.py scan CACHE_DIR                            → JSON on stdout
"""

import json
import sys

from huggingface_hub import hf_hub_download, scan_cache_dir


def main():
    cmd, cache = sys.argv[1], sys.argv[2]
    if cmd == "download":
        repo_type, repo_id, files = sys.argv[3], sys.argv[4], sys.argv[5:]
        for f in files:
            hf_hub_download(repo_id, f, repo_type=repo_type, cache_dir=cache)
    elif cmd == "scan":
        info = scan_cache_dir(cache)
        repos = [
            {
                "repo_id": r.repo_id,
                "repo_type": r.repo_type,
                "size_on_disk": r.size_on_disk,
                "size_on_disk_str": r.size_on_disk_str,
                "nb_files": r.nb_files,
                "refs": sorted(r.refs),
                "repo_path": str(r.repo_path),
                "files": sorted(f.file_name for rev in r.revisions for f in rev.files),
                "revisions": sorted(rev.commit_hash for rev in r.revisions),
            }
            for r in sorted(info.repos, key=lambda r: r.repo_path)
        ]
        print(json.dumps({"repos": repos, "warnings": [str(w) for w in info.warnings]}))
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
