"""The fake upstream's calls on the objects models make and use: stored responses,
fine-tuning jobs, containers and conversations: each a function of the store and the call,
returning the answer's payload or raising `ObjectError`. A fine-tuning job has `succeeded`
with a result file once retrieved after its creation, as OpenAI's would in time.
"""

from __future__ import annotations

from typing import Any

from gateway.devtools.fake_object_store import (
    Call,
    FakeObjects,
    ObjectError,
    Route,
    message_items,
    page,
    required,
)

# ------------------------------------------------------------------ responses


def _get_response(objects: FakeObjects, call: Call) -> Any:
    return objects.get("response", call.segments[1], "Response")


def _delete_response(objects: FakeObjects, call: Call) -> Any:
    response_id = call.segments[1]
    objects.remove("response", response_id, "Response")
    return {"id": response_id, "object": "response", "deleted": True}


def _response_input_items(objects: FakeObjects, call: Call) -> Any:
    response_id = call.segments[1]
    objects.get("response", response_id, "Response")
    return page(list(objects.members_of(response_id).values()), call.query)


def _cancel_response(objects: FakeObjects, call: Call) -> Any:
    response = objects.get("response", call.segments[1], "Response")
    if response.get("background") is not True:
        raise ObjectError(400, "Only responses created with background=true can be cancelled.")
    response["status"] = "cancelled"
    return response


# ------------------------------------------------------------------ fine-tuning jobs


def _create_job(objects: FakeObjects, call: Call) -> Any:
    model = required(call, "model")
    training_file = required(call, "training_file")
    objects.get("file", training_file, "File")
    validation_file = call.body.get("validation_file")
    if validation_file is not None:
        objects.get("file", validation_file, "File")
    return objects.add(
        "fine_tuning_job",
        {
            "object": "fine_tuning.job",
            "id": objects.new_id("fine_tuning_job"),
            "model": model,
            "created_at": call.now,
            "finished_at": None,
            "fine_tuned_model": None,
            "organization_id": "org-fake",
            "result_files": [],
            "status": "validating_files",
            "validation_file": validation_file,
            "training_file": training_file,
            "hyperparameters": {"n_epochs": "auto", "batch_size": "auto"},
            "trained_tokens": None,
            "error": None,
            "seed": call.body.get("seed", 42),
            "metadata": call.body.get("metadata"),
        },
    )


def _get_job(objects: FakeObjects, call: Call) -> Any:
    job = objects.get("fine_tuning_job", call.segments[2], "FineTuningJob")
    if job["status"] == "validating_files":
        metrics = b"step,train_loss\n1,0.5\n"
        result = objects.add_file(metrics, "step_metrics.csv", "fine-tune-results", call.now)
        job.update(
            status="succeeded",
            finished_at=call.now,
            fine_tuned_model=f"ft:{job['model']}:fake::{job['id'].removeprefix('ftjob-')}",
            result_files=[result["id"]],
            trained_tokens=100,
        )
    return job


def _list_jobs(objects: FakeObjects, call: Call) -> Any:
    return page(list(objects.store["fine_tuning_job"].values()), call.query, orderable=False)


def _cancel_job(objects: FakeObjects, call: Call) -> Any:
    job = objects.get("fine_tuning_job", call.segments[2], "FineTuningJob")
    if job["status"] in ("succeeded", "failed", "cancelled"):
        raise ObjectError(400, f"Job {job['id']} is already {job['status']}.")
    job["status"] = "cancelled"
    return job


def _job_events(objects: FakeObjects, call: Call) -> Any:
    job = objects.get("fine_tuning_job", call.segments[2], "FineTuningJob")
    event = {
        "object": "fine_tuning.job.event",
        "id": f"ftevent-{job['id'].removeprefix('ftjob-')}",
        "created_at": job["created_at"],
        "level": "info",
        "message": "Created fine-tuning job",
        "data": {},
        "type": "message",
    }
    return page([event], call.query, orderable=False)


# ------------------------------------------------------------------ containers


def _create_container(objects: FakeObjects, call: Call) -> Any:
    name = required(call, "name")
    for file_id in call.body.get("file_ids") or ():
        objects.get("file", file_id, "File")
    return objects.add(
        "container",
        {
            "id": objects.new_id("container"),
            "object": "container",
            "created_at": call.now,
            "status": "running",
            "expires_after": call.body.get("expires_after")
            or {"anchor": "last_active_at", "minutes": 20},
            "last_active_at": call.now,
            "name": name,
        },
    )


def _get_container(objects: FakeObjects, call: Call) -> Any:
    return objects.get("container", call.segments[1], "Container")


def _delete_container(objects: FakeObjects, call: Call) -> Any:
    container_id = call.segments[1]
    objects.remove("container", container_id, "Container")
    return {"id": container_id, "object": "container.deleted", "deleted": True}


def _list_containers(objects: FakeObjects, call: Call) -> Any:
    return page(list(objects.store["container"].values()), call.query)


# ------------------------------------------------------------------ conversations


def _create_conversation(objects: FakeObjects, call: Call) -> Any:
    conversation = objects.add(
        "conversation",
        {
            "id": objects.new_id("conversation"),
            "object": "conversation",
            "created_at": call.now,
            "metadata": call.body.get("metadata") or {},
        },
    )
    items = objects.members_of(conversation["id"])
    for item in message_items(objects, call.body.get("items")):
        items[item["id"]] = item
    return conversation


def _get_conversation(objects: FakeObjects, call: Call) -> Any:
    return objects.get("conversation", call.segments[1], "Conversation")


def _update_conversation(objects: FakeObjects, call: Call) -> Any:
    conversation = objects.get("conversation", call.segments[1], "Conversation")
    conversation["metadata"] = required(call, "metadata")
    return conversation


def _delete_conversation(objects: FakeObjects, call: Call) -> Any:
    conversation_id = call.segments[1]
    objects.remove("conversation", conversation_id, "Conversation")
    return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}


def _conversation_items(objects: FakeObjects, call: Call) -> Any:
    conversation_id = call.segments[1]
    objects.get("conversation", conversation_id, "Conversation")
    return page(list(objects.members_of(conversation_id).values()), call.query)


MODEL_ROUTES: tuple[Route, ...] = (
    (("responses", "*"), "GET", _get_response),
    (("responses", "*"), "DELETE", _delete_response),
    (("responses", "*", "input_items"), "GET", _response_input_items),
    (("responses", "*", "cancel"), "POST", _cancel_response),
    (("fine_tuning", "jobs"), "POST", _create_job),
    (("fine_tuning", "jobs"), "GET", _list_jobs),
    (("fine_tuning", "jobs", "*"), "GET", _get_job),
    (("fine_tuning", "jobs", "*", "cancel"), "POST", _cancel_job),
    (("fine_tuning", "jobs", "*", "events"), "GET", _job_events),
    (("containers",), "POST", _create_container),
    (("containers",), "GET", _list_containers),
    (("containers", "*"), "GET", _get_container),
    (("containers", "*"), "DELETE", _delete_container),
    (("conversations",), "POST", _create_conversation),
    (("conversations", "*"), "GET", _get_conversation),
    (("conversations", "*"), "POST", _update_conversation),
    (("conversations", "*"), "DELETE", _delete_conversation),
    (("conversations", "*", "items"), "GET", _conversation_items),
)
