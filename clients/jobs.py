"""`python -m clients jobs ...`: start training and export jobs, list, inspect, cancel, resume and watch them.

  jobs start-training --dataset D --model M [--recipe R] [--set K=V ...] [--seed S] [--nproc N] [--watch]
  jobs start-export MODEL [--int8] [--name N] [--watch]
  jobs list [--kind K] [--state S] | get ID | cancel ID | resume ID [--watch] | watch ID [--replay]
"""
from __future__ import annotations

import argparse

from clients.channel import open_channel
from clients.output import compact_json, print_fields, print_json, when
from clients.watch import kind_name, state_name, watch_job
from protos.ulm.v1 import jobs_pb2 as jpb
from protos.ulm.v1 import jobs_pb2_grpc

KINDS = ["dataset", "training", "export"]
STATES = ["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]


def job_line(job: jpb.Job) -> str:
    p = job.progress
    progress = f"step {p.step}/{p.total}" if p.total else (f"{p.fraction:.0%}" if p.fraction else "")
    if p.loss:
        progress += f" loss {p.loss:.4f}"
    outcome = job.result if job.state == jpb.JOB_STATE_SUCCEEDED else job.error
    return "  ".join(x for x in (job.id, f"{kind_name(job.kind):8}", f"{state_name(job.state):11}",
                                 when(job.created_at), progress, outcome) if x)


def print_job(job: jpb.Job, as_json: bool = False) -> None:
    if as_json:
        print_json(job)
        return
    print_fields(job, skip=("spec_json",))
    print(f"spec_json: {compact_json(job.spec_json)}")


def started(args: argparse.Namespace, channel, job: jpb.Job) -> int:
    """What every start command does with its new job: print it, and follow it with --watch."""
    print(job_line(job))
    if getattr(args, "watch", False):
        return watch_job(channel, job.name or job.id, replay=True)  # from its first event: none is missed
    return 0


def run_start_training(args: argparse.Namespace) -> int:
    request = jpb.StartTrainingRequest(dataset=args.dataset, recipe=args.recipe, overrides=args.set,
                                       model=args.model, nproc=args.nproc, resume_from=args.resume_from)
    if args.seed is not None:
        request.seed = args.seed
    with open_channel(args) as channel:
        return started(args, channel, jobs_pb2_grpc.JobsStub(channel).StartTraining(request, timeout=args.timeout))


def run_start_export(args: argparse.Namespace) -> int:
    request = jpb.StartExportRequest(model=args.model, quantize="int8" if args.int8 else "", name=args.name)
    with open_channel(args) as channel:
        return started(args, channel, jobs_pb2_grpc.JobsStub(channel).StartExport(request, timeout=args.timeout))


def run_list(args: argparse.Namespace) -> None:
    kind = jpb.JobKind.Value(f"JOB_KIND_{args.kind.upper()}") if args.kind else jpb.JOB_KIND_UNSPECIFIED
    state = jpb.JobState.Value(f"JOB_STATE_{args.state.upper()}") if args.state else jpb.JOB_STATE_UNSPECIFIED
    jobs, token = [], ""
    with open_channel(args) as channel:
        stub = jobs_pb2_grpc.JobsStub(channel)
        while len(jobs) < args.limit:
            page = stub.ListJobs(jpb.ListJobsRequest(kind=kind, state=state, page_size=min(args.limit, 1000),
                                                     page_token=token), timeout=args.timeout)
            jobs.extend(page.jobs)
            token = page.next_page_token
            if not token:
                break
    if args.json:
        print_json(jpb.ListJobsResponse(jobs=jobs[:args.limit], next_page_token=token))
        return
    for job in jobs[:args.limit]:
        print(job_line(job))


def run_one(method: str):
    """get, cancel, resume: a call on one job by name, then the job printed (resume may --watch it)."""
    request_type = {"GetJob": jpb.GetJobRequest, "CancelJob": jpb.CancelJobRequest,
                    "ResumeJob": jpb.ResumeJobRequest}[method]

    def run(args: argparse.Namespace) -> int:
        with open_channel(args) as channel:
            job = getattr(jobs_pb2_grpc.JobsStub(channel), method)(request_type(name=args.id), timeout=args.timeout)
            if method == "GetJob":
                print_job(job, args.json)
                return 0
            return started(args, channel, job)
    return run


def run_watch(args: argparse.Namespace) -> int:
    with open_channel(args) as channel:
        return watch_job(channel, args.id, replay=args.replay, timeout=args.timeout)


def add_commands(sub, conn: argparse.ArgumentParser) -> None:
    jobs = sub.add_parser("jobs", help="training and export jobs; every pipeline's progress").add_subparsers(
        dest="action", required=True)
    t = jobs.add_parser("start-training", parents=[conn], help="train a model on a dataset")
    t.add_argument("--dataset", default="", help="a dataset's name (none for a recipe that makes its own data)")
    t.add_argument("--model", required=True, help="the name of the model it writes")
    t.add_argument("--recipe", default="", help="a training recipe, e.g. shakespeare-char")
    t.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, as `ulm train --set` takes them, e.g. --set lr=3e-4 max_iters=500")
    t.add_argument("--seed", type=int)
    t.add_argument("--nproc", type=int, default=1, help="processes (torchrun on the server)")
    t.add_argument("--resume-from", default="", help="a model's name: continue its run")
    t.add_argument("--watch", action="store_true", help="follow it with a progress bar")
    t.set_defaults(func=run_start_training)
    e = jobs.add_parser("start-export", parents=[conn], help="export a model to ONNX")
    e.add_argument("model")
    e.add_argument("--int8", action="store_true", help="quantize the weights to int8")
    e.add_argument("--name", default="", help="the export's name (default <model>-onnx or <model>-int8)")
    e.add_argument("--watch", action="store_true")
    e.set_defaults(func=run_start_export)
    ls = jobs.add_parser("list", parents=[conn], help="a line per job, newest first")
    ls.add_argument("--kind", choices=KINDS)
    ls.add_argument("--state", choices=STATES)
    ls.add_argument("--limit", type=int, default=50)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)
    for action, method, text in (("get", "GetJob", "a job's fields"), ("cancel", "CancelJob", "stop a job"),
                                 ("resume", "ResumeJob", "continue a training job from its last checkpoint")):
        p = jobs.add_parser(action, parents=[conn], help=text)
        p.add_argument("id", help="the job's id (or jobs/<id>)")
        if action == "get":
            p.add_argument("--json", action="store_true")
        if action == "resume":
            p.add_argument("--watch", action="store_true")
        p.set_defaults(func=run_one(method))
    w = jobs.add_parser("watch", parents=[conn], help="a live progress bar until the job ends (exit 0: succeeded)")
    w.add_argument("id")
    w.add_argument("--replay", action="store_true", help="show the job's earlier events (log lines) first")
    w.set_defaults(func=run_watch)
