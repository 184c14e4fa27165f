"""ulm.v1.Jobs: training and export jobs, and every job's state, events and control (server.jobs).

Its flags size the job system: --max-jobs running at once, --max-queued-jobs waiting, --job-threads per job.
The job manager itself lives in Shared (the Datasets service submits its builds there too); this service starts
and closes it.
"""
from __future__ import annotations

import argparse
import contextlib

import grpc

from protos.ulm.v1 import jobs_pb2 as jpb
from protos.ulm.v1 import jobs_pb2_grpc as jpb_grpc
from server.data_root import check_name
from server.errors import InvalidArgument
from server.jobs.manager import JobManager
from server.jobs.requests import export_spec, training_spec
from server.jobs.store import kind_name, state_name
from server.services import ServiceSpec, register
from server.shared import Shared
from ulm.util import usable_cores


def default_job_threads() -> int:
    return max(1, usable_cores() - 1)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("jobs (dataset builds, training, exports in child processes)")
    g.add_argument("--max-jobs", type=int, default=1, help="jobs that run at once")
    g.add_argument("--max-queued-jobs", type=int, default=16,
                   help="jobs that may wait for a free slot (QUEUED); more get RESOURCE_EXHAUSTED")
    g.add_argument("--job-threads", type=int, default=default_job_threads(),
                   help="threads of each job (OMP_NUM_THREADS, training's threads, shared by its processes); the "
                        "default leaves one core to generation, so streams keep flowing while a job trains")
    g.add_argument("--job-cancel-grace", type=float, default=30.0,
                   help="seconds a cancelled or stopped job gets after SIGTERM (training saves its checkpoint) "
                        "before SIGKILL")


class JobsService(jpb_grpc.JobsServicer):
    name = jpb.DESCRIPTOR.services_by_name["Jobs"].full_name

    def __init__(self, args: argparse.Namespace, shared: Shared):
        self.jobs: JobManager = shared.jobs if shared.jobs is not None else JobManager(args, shared)
        shared.jobs = self.jobs
        self.root = shared.data_root
        self.threads = args.job_threads

    def add_to_server(self, server: grpc.aio.Server) -> None:
        jpb_grpc.add_JobsServicer_to_server(self, server)

    async def start(self) -> None:
        await self.jobs.start()

    async def drain(self, timeout: float) -> None:
        await self.jobs.drain()

    async def close(self) -> None:
        await self.jobs.close()

    # -- RPCs -------------------------------------------------------------------------------------------

    async def StartTraining(self, request: jpb.StartTrainingRequest, context) -> jpb.Job:
        return self.jobs.submit(training_spec(request, self.root, self.jobs, self.threads))

    async def StartExport(self, request: jpb.StartExportRequest, context) -> jpb.Job:
        return self.jobs.submit(export_spec(request, self.root, self.jobs, self.threads))

    async def GetJob(self, request: jpb.GetJobRequest, context) -> jpb.Job:
        return self.jobs.get(job_id(request.name)).to_proto()

    async def ListJobs(self, request: jpb.ListJobsRequest, context) -> jpb.ListJobsResponse:
        try:
            kind = kind_name(request.kind) if request.kind else ""
            state = state_name(request.state) if request.state else ""
        except ValueError as e:
            raise InvalidArgument(f"kind or state is not a JobKind or JobState value: {e}") from None
        jobs, token = self.jobs.list(kind, state, request.page_size, request.page_token)
        return jpb.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(self, request: jpb.CancelJobRequest, context) -> jpb.Job:
        return await self.jobs.cancel(job_id(request.name))

    async def ResumeJob(self, request: jpb.ResumeJobRequest, context) -> jpb.Job:
        return self.jobs.resume(job_id(request.name))

    async def WatchJob(self, request: jpb.WatchJobRequest, context):
        events = self.jobs.watch(job_id(request.name), request.since_sequence, request.replay_all)
        async with contextlib.aclosing(events):  # a client that leaves unsubscribes now, not when collected
            async for event in events:
                yield event


def job_id(name: str) -> str:
    """"jobs/<id>" or "<id>", checked."""
    return check_name(name.removeprefix("jobs/"), "name")


register(ServiceSpec(JobsService.name, JobsService, add_arguments))
