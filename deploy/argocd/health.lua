-- Argo CD health check for dbt-backfill.io/DbtBackfill.
--
-- Install: argocd-cm key `resource.customizations.health.dbt-backfill.io_DbtBackfill`
-- (argocd-cm.yaml beside this file carries this exact script; README.md explains).
--
-- Mapping, first match wins:
--   no status, or no phase and Succeeded not decided -> Progressing  "Waiting for operator"
--   status.observedGeneration < metadata.generation    -> Progressing  (spec change not seen yet)
--   phase Pending | Queued | Running                   -> Progressing  (with progress)
--   phase Suspended                                    -> Suspended    (spec.suspend: true)
--   condition Succeeded = True                         -> Healthy
--   condition Succeeded = False                        -> Degraded     (its message)
--   phase Succeeded                                    -> Healthy      (no condition yet)
--   phase Failed | Cancelled                           -> Degraded     (no condition yet)
--   anything else                                      -> Unknown
-- A running phase wins over a stale Succeeded condition: re-running failed chunks
-- (spec.retryFailed) moves a finished backfill back to Running.
--
-- Argo CD runs this in gopher-lua (Lua 5.1) with only the safe standard libraries, and every
-- JSON number arrives as a float: keep to Lua 5.1 syntax and format numbers with num().
-- tests/unit/test_argocd_health.py runs it under lua5.4 (and lua5.1 when installed) against
-- tests/unit/argocd_health_cases.json.

local hs = {}

local function num(value)
  if type(value) ~= "number" then
    return nil
  end
  return string.format("%d", math.floor(value))
end

local function condition(status, wanted)
  if status == nil or type(status.conditions) ~= "table" then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

-- "12/31 chunks done, 2 failed, 3 running" from status.progress and status.chunks.
local function progress(status)
  local parts = {}
  local chunks = status.chunks
  if type(status.progress) == "string" and status.progress ~= "" then
    table.insert(parts, status.progress .. " chunks done")
  elseif type(chunks) == "table" and num(chunks.total) ~= nil then
    local done = (chunks.succeeded or 0) + (chunks.failed or 0)
    table.insert(parts, num(done) .. "/" .. num(chunks.total) .. " chunks done")
  end
  if type(chunks) == "table" then
    if (chunks.failed or 0) > 0 then
      table.insert(parts, num(chunks.failed) .. " failed")
    end
    if (chunks.running or 0) > 0 then
      table.insert(parts, num(chunks.running) .. " running")
    end
  end
  return table.concat(parts, ", ")
end

local function join(prefix, detail)
  if detail == nil or detail == "" then
    return prefix
  end
  return prefix .. ": " .. detail
end

local status = obj.status
local succeeded = condition(status, "Succeeded")
local phase = nil
if status ~= nil and type(status.phase) == "string" and status.phase ~= "" then
  phase = status.phase
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end

local decided = succeeded ~= nil and (succeeded.status == "True" or succeeded.status == "False")
if status == nil or (phase == nil and not decided) then
  hs.status = "Progressing"
  if succeeded ~= nil and type(succeeded.message) == "string" and succeeded.message ~= "" then
    hs.message = succeeded.message
  else
    hs.message = "Waiting for operator"
  end
  return hs
end

if type(generation) == "number" and type(status.observedGeneration) == "number"
    and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for operator to observe generation " .. num(generation)
  return hs
end

if phase == "Pending" then
  hs.status = "Progressing"
  hs.message = join("Pending", progress(status))
  return hs
end

if phase == "Queued" then
  hs.status = "Progressing"
  if type(status.queuedBehind) == "string" and status.queuedBehind ~= "" then
    hs.message = join("Queued behind " .. status.queuedBehind, progress(status))
  else
    hs.message = join("Queued", progress(status))
  end
  return hs
end

if phase == "Running" then
  hs.status = "Progressing"
  local message = join("Running", progress(status))
  if type(status.estimatedCompletionTime) == "string" and status.estimatedCompletionTime ~= "" then
    message = message .. " (ETA " .. status.estimatedCompletionTime .. ")"
  end
  hs.message = message
  return hs
end

if phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = join("Suspended", progress(status))
  return hs
end

if succeeded ~= nil and succeeded.status == "True" then
  hs.status = "Healthy"
  if type(succeeded.message) == "string" and succeeded.message ~= "" then
    hs.message = succeeded.message
  else
    hs.message = join("Succeeded", progress(status))
  end
  return hs
end

if succeeded ~= nil and succeeded.status == "False" then
  hs.status = "Degraded"
  if type(succeeded.message) == "string" and succeeded.message ~= "" then
    hs.message = succeeded.message
  else
    hs.message = join(succeeded.reason or phase or "Failed", progress(status))
  end
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = join("Succeeded", progress(status))
  return hs
end

if phase == "Failed" or phase == "Cancelled" then
  hs.status = "Degraded"
  hs.message = join(phase, progress(status))
  return hs
end

hs.status = "Unknown"
hs.message = "Unrecognised phase " .. tostring(phase)
return hs
