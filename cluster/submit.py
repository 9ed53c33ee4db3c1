"""`disagg submit`: run `disagg serve` as a Ray job on a cluster (Ray job submission)."""
from __future__ import annotations

import shlex
import time

from engine.errors import DisaggError

# Options that belong to `submit` itself; everything else is passed to `disagg serve`. The
# token options are not passed on: the token travels in the job's environment, never in its
# entrypoint (which `ray job list`, the dashboard and `ps` on the head node show).
SUBMIT_OPTIONS = {"--address": True, "--job-id": True, "--working-dir": True, "--pip": True, "--no-wait": False,
                  "--auth-token": True, "--auth-token-file": True}


def split_argv(argv: list[str]) -> list[str]:
    """The `serve` arguments: argv without submit's own options."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in SUBMIT_OPTIONS:
            skip = SUBMIT_OPTIONS[name] and "=" not in a
            continue
        out.append(a)
    return out


def _submit_with_retry(client, entry: str, runtime_env, job_id, timeout_s: float = 60.0) -> str:
    """A head node that just started answers 500 'No available agent' for a while: retry that;
    anything else (or still failing at the deadline) becomes one clear error."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entry, runtime_env=runtime_env, submission_id=job_id)
        except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError with the HTTP status
            transient = "No available agent" in str(e) or "try again" in str(e)
            if not transient or time.monotonic() > deadline:
                raise DisaggError(f"job submission failed: {str(e).strip().splitlines()[-1]}") from None
            time.sleep(1.0)


def submit(args, serve_argv: list[str]) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient
    try:
        client = JobSubmissionClient(args.address)
    except Exception as e:  # noqa: BLE001 - unreachable dashboard: one clear line
        raise DisaggError(f"cannot reach the Ray dashboard at {args.address}: {e}") from None
    runtime_env = {}
    if args.working_dir:
        runtime_env["working_dir"] = args.working_dir
    if args.pip:
        runtime_env["pip"] = args.pip
    from cluster.serve import auth_token_from_args
    token = auth_token_from_args(args)
    if token:
        runtime_env["env_vars"] = {"DISAGG_AUTH_TOKEN": token}
    entry = "disagg serve " + shlex.join(serve_argv)
    job_id = _submit_with_retry(client, entry, runtime_env or None, args.job_id)
    print(f"submitted job {job_id}: {entry}", flush=True)
    if args.no_wait:
        return 0
    # Wait until the job is running and the server says it is ready (or the job failed).
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.FAILED, JobStatus.STOPPED):
            logs = client.get_job_logs(job_id)
            raise DisaggError(f"job {job_id} {status.value.lower()}: {logs.strip().splitlines()[-1] if logs.strip() else ''}")
        if status == JobStatus.RUNNING and "disagg serve: ready" in client.get_job_logs(job_id):
            line = [ln for ln in client.get_job_logs(job_id).splitlines() if "disagg serve: ready" in ln][-1]
            print(f"job {job_id}: {line}", flush=True)
            print(f"stop it with: ray job stop --address {args.address} {job_id}", flush=True)
            return 0
        time.sleep(1.0)
    raise DisaggError(f"job {job_id} did not become ready within 600 s")
