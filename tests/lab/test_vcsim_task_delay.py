"""vcsim's ``-task-delay`` (lab/vcsim/taskdelay.go): a task method answers at once with a task
that stays queued for the delay, then ends with what the real call did, result or fault; as a
vCenter's tasks do, so that a client polling them holds no connection meanwhile."""

from __future__ import annotations

import time
from typing import Any

from pyVmomi import vim


def wait(task: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while task.info.state not in ("success", "error"):
        assert time.monotonic() < deadline, f"task {task._moId} still {task.info.state}"
        time.sleep(0.05)
    return task.info


def names(si: Any) -> set[str]:
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    try:
        return {vm.name for vm in view.view}
    finally:
        view.Destroy()


def test_a_delayed_clone_answers_at_once_and_is_made_only_after_the_delay(vcsim_factory: Any) -> None:
    lab = vcsim_factory(["-task-delay=CloneVM_Task=1500"])
    si = lab.connect()
    template = vim.VirtualMachine(lab.inventory.template_id, si._stub)
    folder = vim.Folder(lab.inventory.folder_id, si._stub)
    pool = vim.ResourcePool(lab.inventory.resource_pool_id, si._stub)
    spec = vim.vm.CloneSpec(location=vim.vm.RelocateSpec(pool=pool), powerOn=False, template=False)

    started = time.monotonic()
    task = template.CloneVM_Task(folder=folder, name="delayed-clone", spec=spec)
    answered = time.monotonic() - started
    assert answered < 1.0, answered
    assert task.info.state == "queued"
    assert "delayed-clone" not in names(si)  # nothing made yet, as with a clone still copying

    info = wait(task)
    assert info.state == "success", info.error
    assert time.monotonic() - started >= 1.5
    assert info.descriptionId == "VirtualMachine.CloneVM"
    assert isinstance(info.result, vim.VirtualMachine) and info.result.name == "delayed-clone"
    assert "delayed-clone" in names(si)


def test_a_delayed_task_ends_with_the_fault_of_the_real_call(vcsim_factory: Any) -> None:
    lab = vcsim_factory(["-task-delay=PowerOnVM_Task=300"])
    si = lab.connect()
    content = si.RetrieveContent()
    view = content.viewManager.CreateContainerView(content.rootFolder, [vim.VirtualMachine], True)
    vm = next(v for v in view.view if not v.config.template and v.runtime.powerState == "poweredOn")
    view.Destroy()

    info = wait(vm.PowerOnVM_Task())  # already on: vcsim's own fault
    assert info.state == "error"
    assert isinstance(info.error, vim.fault.InvalidPowerState)
