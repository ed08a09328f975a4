//! Pieces of the OCI spec's JSON and their NRI messages, both ways.

use super::NriError;
use imacri_nri_api::api;
use oci_spec::runtime::Spec;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

pub(super) fn to_json(spec: &Spec) -> Result<Value, NriError> {
    serde_json::to_value(spec).map_err(|e| NriError::Spec(e.to_string()))
}

pub(super) fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn str_map(v: &Value) -> HashMap<String, String> {
    v.as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub(super) fn opt_i64(v: &Value) -> Option<api::OptionalInt64> {
    v.as_i64().map(|value| api::OptionalInt64 { value })
}
pub(super) fn opt_u64(v: &Value) -> Option<api::OptionalUInt64> {
    v.as_u64().map(|value| api::OptionalUInt64 { value })
}

pub(super) fn seccomp_from_json(v: &Value) -> Option<api::LinuxSeccomp> {
    let o = v.as_object()?;
    Some(api::LinuxSeccomp {
        default_action: o
            .get("defaultAction")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .into(),
        default_errno: o
            .get("defaultErrnoRet")
            .and_then(|v| v.as_u64())
            .map(|v| api::OptionalUInt32 { value: v as u32 }),
        architectures: o.get("architectures").map(strs).unwrap_or_default(),
        flags: o.get("flags").map(strs).unwrap_or_default(),
        listener_path: o
            .get("listenerPath")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .into(),
        listener_metadata: o
            .get("listenerMetadata")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .into(),
        syscalls: o
            .get("syscalls")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|s| api::LinuxSyscall {
                        names: s.get("names").map(strs).unwrap_or_default(),
                        action: s
                            .get("action")
                            .and_then(|v| v.as_str())
                            .unwrap_or_default()
                            .into(),
                        errno_ret: s
                            .get("errnoRet")
                            .and_then(|v| v.as_u64())
                            .map(|v| api::OptionalUInt32 { value: v as u32 }),
                        args: s
                            .get("args")
                            .and_then(|v| v.as_array())
                            .map(|a| {
                                a.iter()
                                    .map(|x| api::LinuxSeccompArg {
                                        index: x.get("index").and_then(|v| v.as_u64()).unwrap_or(0)
                                            as u32,
                                        value: x.get("value").and_then(|v| v.as_u64()).unwrap_or(0),
                                        value_two: x
                                            .get("valueTwo")
                                            .and_then(|v| v.as_u64())
                                            .unwrap_or(0),
                                        op: x
                                            .get("op")
                                            .and_then(|v| v.as_str())
                                            .unwrap_or_default()
                                            .into(),
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

pub(super) fn seccomp_to_json(s: &api::LinuxSeccomp) -> Value {
    let mut o = Map::new();
    o.insert("defaultAction".into(), json!(s.default_action));
    if let Some(e) = &s.default_errno {
        o.insert("defaultErrnoRet".into(), json!(e.value));
    }
    if !s.architectures.is_empty() {
        o.insert("architectures".into(), json!(s.architectures));
    }
    if !s.flags.is_empty() {
        o.insert("flags".into(), json!(s.flags));
    }
    if !s.listener_path.is_empty() {
        o.insert("listenerPath".into(), json!(s.listener_path));
    }
    if !s.listener_metadata.is_empty() {
        o.insert("listenerMetadata".into(), json!(s.listener_metadata));
    }
    let calls: Vec<Value> = s
        .syscalls
        .iter()
        .map(|c| {
            let mut r = json!({"names": c.names, "action": c.action});
            if let Some(e) = &c.errno_ret {
                r["errnoRet"] = json!(e.value);
            }
            if !c.args.is_empty() {
                r["args"] = Value::Array(
                    c.args
                        .iter()
                        .map(|a| {
                            json!({"index": a.index, "value": a.value,
                                   "valueTwo": a.value_two, "op": a.op})
                        })
                        .collect(),
                );
            }
            r
        })
        .collect();
    if !calls.is_empty() {
        o.insert("syscalls".into(), Value::Array(calls));
    }
    Value::Object(o)
}

pub(super) fn resources_from_json(r: &Value) -> api::LinuxResources {
    let mem = &r["memory"];
    let cpu = &r["cpu"];
    api::LinuxResources {
        memory: mem.is_object().then(|| api::LinuxMemory {
            limit: opt_i64(&mem["limit"]),
            reservation: opt_i64(&mem["reservation"]),
            swap: opt_i64(&mem["swap"]),
            swappiness: opt_u64(&mem["swappiness"]),
            ..Default::default()
        }),
        cpu: cpu.is_object().then(|| api::LinuxCpu {
            shares: opt_u64(&cpu["shares"]),
            quota: opt_i64(&cpu["quota"]),
            period: opt_u64(&cpu["period"]),
            cpus: cpu["cpus"].as_str().unwrap_or_default().into(),
            mems: cpu["mems"].as_str().unwrap_or_default().into(),
            ..Default::default()
        }),
        hugepage_limits: r["hugepageLimits"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|h| api::HugepageLimit {
                        page_size: h["pageSize"].as_str().unwrap_or_default().into(),
                        limit: h["limit"].as_u64().unwrap_or(0),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        unified: str_map(&r["unified"]),
        pids: r["pids"]["limit"]
            .as_i64()
            .map(|limit| api::LinuxPids { limit }),
        ..Default::default()
    }
}

/// `v[key]` as an object, made one if it is not (`v` itself must be an
/// object or null).
pub(super) fn obj<'a>(v: &'a mut Value, key: &str) -> Result<&'a mut Map<String, Value>, NriError> {
    if !v.is_object() && !v.is_null() {
        return Err(NriError::Spec(format!("{key}: parent is not an object")));
    }
    if !v[key].is_object() {
        v[key] = Value::Object(Map::new());
    }
    v[key]
        .as_object_mut()
        .ok_or_else(|| NriError::Spec(format!("{key} is not an object")))
}

/// `v[key]` as an array, made one if it is not.
pub(super) fn arr<'a>(v: &'a mut Value, key: &str) -> Result<&'a mut Vec<Value>, NriError> {
    if !v.is_object() && !v.is_null() {
        return Err(NriError::Spec(format!("{key}: parent is not an object")));
    }
    if !v[key].is_array() {
        v[key] = Value::Array(Vec::new());
    }
    v[key]
        .as_array_mut()
        .ok_or_else(|| NriError::Spec(format!("{key} is not an array")))
}

pub(super) fn set_resources(res: &mut Value, r: &api::LinuxResources) -> Result<(), NriError> {
    if let Some(m) = &r.memory {
        let mem = obj(res, "memory")?;
        for (k, v) in [
            ("limit", m.limit.as_ref().map(|v| json!(v.value))),
            (
                "reservation",
                m.reservation.as_ref().map(|v| json!(v.value)),
            ),
            ("swap", m.swap.as_ref().map(|v| json!(v.value))),
            ("swappiness", m.swappiness.as_ref().map(|v| json!(v.value))),
            ("kernel", m.kernel.as_ref().map(|v| json!(v.value))),
            ("kernelTCP", m.kernel_tcp.as_ref().map(|v| json!(v.value))),
            (
                "disableOOMKiller",
                m.disable_oom_killer.as_ref().map(|v| json!(v.value)),
            ),
            (
                "useHierarchy",
                m.use_hierarchy.as_ref().map(|v| json!(v.value)),
            ),
        ] {
            if let Some(v) = v {
                mem.insert(k.into(), v);
            }
        }
    }
    if let Some(c) = &r.cpu {
        let cpu = obj(res, "cpu")?;
        for (k, v) in [
            ("shares", c.shares.as_ref().map(|v| json!(v.value))),
            ("quota", c.quota.as_ref().map(|v| json!(v.value))),
            ("period", c.period.as_ref().map(|v| json!(v.value))),
            (
                "realtimeRuntime",
                c.realtime_runtime.as_ref().map(|v| json!(v.value)),
            ),
            (
                "realtimePeriod",
                c.realtime_period.as_ref().map(|v| json!(v.value)),
            ),
            ("cpus", (!c.cpus.is_empty()).then(|| json!(c.cpus))),
            ("mems", (!c.mems.is_empty()).then(|| json!(c.mems))),
        ] {
            if let Some(v) = v {
                cpu.insert(k.into(), v);
            }
        }
    }
    if let Some(p) = &r.pids {
        obj(res, "pids")?.insert("limit".into(), json!(p.limit));
    }
    if !r.hugepage_limits.is_empty() {
        let h = arr(res, "hugepageLimits")?;
        for l in &r.hugepage_limits {
            h.retain(|x| x["pageSize"] != json!(l.page_size));
            h.push(json!({"pageSize": l.page_size, "limit": l.limit}));
        }
    }
    if !r.unified.is_empty() {
        let u = obj(res, "unified")?;
        for (k, v) in &r.unified {
            u.insert(k.clone(), json!(v));
        }
    }
    Ok(())
}
