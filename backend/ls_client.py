"""Read a live Label Studio project the way the offline tools need it.

Thin on purpose: ``label_studio_sdk.LabelStudio`` already does authentication (legacy tokens
and personal access tokens, which it exchanges for short-lived JWTs), retries and paging
(``GET /api/tasks`` page by page, stopping at Label Studio's 404 "Invalid page.").  This module
only turns its typed task models into plain dicts shaped like Label Studio's JSON export, so
every converter has ONE input format whether it reads a file or a live project.  The task list
API is used rather than the project export endpoint because it pages: the export endpoint
builds the whole file in one request and times out on large projects.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
from label_studio_sdk import LabelStudio, PredictionRequest


class LabelStudioClient:
    """A Label Studio server at ``url``, reached with ``api_key``.

    ``httpx_client`` exists for tests (an ``httpx.MockTransport``) and for callers that need
    proxies or custom TLS; the SDK's default client is used otherwise.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        page_size: int = 100,
        timeout_s: float = 60.0,
        httpx_client: httpx.Client | None = None,
    ) -> None:
        if not url:
            raise ValueError("a Label Studio URL is needed (--ls-url or LABEL_STUDIO_URL)")
        if not api_key:
            raise ValueError("a Label Studio API key is needed (--api-key or LABEL_STUDIO_API_KEY)")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self.page_size = page_size
        self._client = LabelStudio(
            base_url=url.rstrip("/"), api_key=api_key, timeout=timeout_s, httpx_client=httpx_client
        )

    def get_label_config(self, project: int) -> str:
        """The project's label config XML (Label Studio's JSON export does not include it)."""
        config = self._client.projects.get(project).label_config
        if not config:
            raise ValueError(f"Label Studio project {project} has no label config")
        return config

    def iter_tasks(self, project: int, *, only_annotated: bool = False) -> Iterator[dict[str, Any]]:
        """Every task of ``project`` with its ``annotations`` and ``predictions``, one page of
        ``page_size`` tasks in memory at a time, as export-shaped dicts (unset fields left out)."""
        pager = self._client.tasks.list(
            project=project,
            fields="all",
            page_size=self.page_size,
            only_annotated=only_annotated or None,
        )
        for task in pager:
            yield task.model_dump(mode="json", exclude_none=True)

    def export_tasks(self, project: int, *, only_annotated: bool = False) -> list[dict[str, Any]]:
        """All tasks of ``project`` as a list, like a Label Studio JSON export file."""
        return list(self.iter_tasks(project, only_annotated=only_annotated))

    # ---- batch pre-annotation (backend.jobs): ids first, task data batch by batch

    def ml_backend_extra_params(self, project: int) -> list[Any]:
        """The ``extra_params`` of every ML backend connected to ``project``, as Label Studio
        stores them (what it sends to the backend's ``/setup``); empty when none is connected."""
        return [backend.extra_params for backend in self._client.ml.list(project=project)]

    def task_ids(self, project: int, *, view: int | None = None, ids: Sequence[int] | None = None) -> list[int]:
        """Ids of the project's tasks in Label Studio's order: all of them, those a Data Manager
        ``view`` shows (its filters and ordering), or those of ``ids`` that exist in the project.
        Only ids travel, so listing 50,000 tasks stays cheap."""
        if ids is None:
            return [task["id"] for task in self._list(project, "id", view=view)]
        return [task["id"] for query in _selections(ids) for task in self._list(project, "id", query=query)]

    def tasks(self, project: int, ids: Sequence[int]) -> list[dict[str, Any]]:
        """``{"id", "data"}`` of the given tasks (those that still exist), in the order of ``ids``."""
        found = {task["id"]: task for query in _selections(ids) for task in self._list(project, "id,data", query=query)}
        return [found[i] for i in ids if i in found]

    def ids_with_model_version(self, project: int, model_version: str, ids: Sequence[int] | None = None) -> set[int]:
        """Ids of tasks (of all, or of ``ids``) holding a prediction of ``model_version``.

        Label Studio filters server side; its "contains" is a substring match, exact for
        version strings of one fixed shape such as ``Settings.model_version``'s.
        """
        has_version = {
            "conjunction": "and",
            "items": [
                {
                    "filter": "filter:tasks:predictions_model_versions",
                    "operator": "contains",
                    "type": "List",
                    "value": [model_version],
                }
            ],
        }
        queries = [json.dumps({"filters": has_version})] if ids is None else _selections(ids, has_version)
        return {task["id"] for query in queries for task in self._list(project, "id", query=query)}

    def _list(
        self, project: int, include: str, *, query: str | None = None, view: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Tasks with only the ``include`` fields, page by page (Data Manager ``query`` / ``view``)."""
        pager = self._client.tasks.list(
            project=project,
            view=view,
            fields="task_only",  # the SDK defaults to "all": annotations and predictions too
            include=include,
            query=query,
            page_size=self.page_size,
        )
        for task in pager:
            yield task.model_dump(mode="json", exclude_none=True)

    def import_predictions(self, project: int, predictions: Sequence[dict[str, Any]]) -> int:
        """Store predictions (``task``, ``result``, ``score``, ``model_version``) in one request;
        returns how many Label Studio created.

        The SDK's automatic retries are off for this POST: a retry after a 5xx or a dropped
        connection can store the batch twice. Callers retry after checking what was stored
        (``backend.jobs.post_predictions``).
        """
        answer = self._client.projects.import_predictions(
            project,
            request=[PredictionRequest(**item) for item in predictions],
            request_options={"max_retries": 0},
        )
        return answer.created or 0

    def delete_predictions(self, task_ids: Sequence[int], model_version: str) -> int:
        """Delete the predictions of ``model_version`` on the given tasks (other versions stay);
        returns how many were deleted."""
        deleted = 0
        for task_id in task_ids:
            for prediction in self._client.predictions.list(task=task_id):
                if prediction.model_version == model_version and prediction.id is not None:
                    self._client.predictions.delete(prediction.id)
                    deleted += 1
        return deleted


_IDS_PER_QUERY = 100  # keeps the GET query string far below common URL length limits


def _selections(ids: Sequence[int], filters: dict[str, Any] | None = None) -> list[str]:
    """Data Manager queries selecting ``ids``, ``_IDS_PER_QUERY`` at a time (plus ``filters``)."""
    queries = []
    for start in range(0, len(ids), _IDS_PER_QUERY):
        query: dict[str, Any] = {
            "selectedItems": {"all": False, "included": [int(i) for i in ids[start : start + _IDS_PER_QUERY]]}
        }
        if filters:
            query["filters"] = filters
        queries.append(json.dumps(query))
    return queries
