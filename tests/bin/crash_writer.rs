//! A writer process for the crash test: it writes distinct items through the
//! store's group-commit writer from several concurrent tasks and prints one
//! line per *acknowledged* write, until it is killed.
//!
//! Usage: `crash-writer DATA_DIR RUN TASKS`
//! Output: `ack SEQ HLC_MS HLC_LOGICAL OP CATEGORY KEY VALUE`

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tiersync::config::Durability;
use tiersync::store::{Mutation, Store};
use tiersync::writer::Writer;
use tiersync_protocol::{NodeId, Value};

/// The node id the crash test's store belongs to.
pub const NODE: &str = "crash-city";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, run, tasks] = args.as_slice() else {
        bail!("usage: crash-writer DATA_DIR RUN TASKS");
    };
    let dir = PathBuf::from(dir);
    let run: u64 = run.parse().context("RUN")?;
    let tasks: u64 = tasks.parse().context("TASKS")?;
    let store = Arc::new(Store::open(
        &dir,
        NodeId::new(NODE)?,
        tiersync_tests::example_policy(),
        Durability::Fsync,
    )?);
    let (writer, _thread) = Writer::spawn(store, 1024)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let writer = writer.clone();
            handles.push(tokio::spawn(async move { task(writer, run, t).await }));
        }
        for h in handles {
            h.await??;
        }
        Ok(())
    })
}

async fn task(writer: Writer, run: u64, t: u64) -> Result<()> {
    for i in 0u64.. {
        let n = i64::try_from(i)?;
        let (op, m) = match i % 3 {
            0 => {
                let key = format!("r{run}-t{t}-{i}");
                let doc = [("v".to_string(), Value::Int(n))].into();
                (
                    "put",
                    Mutation::Put {
                        category: "customer".into(),
                        key,
                        doc,
                    },
                )
            }
            1 => {
                let key = format!("r{run}-t{t}-{i}");
                let fields = [
                    ("customer_id".to_string(), Value::Str(format!("c{t}"))),
                    ("amount".to_string(), Value::Int(n)),
                ]
                .into();
                (
                    "append",
                    Mutation::Append {
                        category: "billing".into(),
                        key,
                        fields,
                    },
                )
            }
            _ => {
                let key = format!("p-r{run}-t{t}-{i}");
                let fields = [("p".to_string(), Some(Value::Int(n)))].into();
                (
                    "patch",
                    Mutation::Patch {
                        category: "customer".into(),
                        key,
                        fields,
                    },
                )
            }
        };
        let (category, key) = {
            let (c, k) = m.target();
            (c.to_string(), k.to_string())
        };
        let applied = writer.apply_one(m).await?;
        let seq = applied
            .seq
            .context("a fresh key always changes the store")?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "ack {seq} {} {} {op} {category} {key} {n}",
            applied.stamp.hlc.physical_ms, applied.stamp.hlc.logical
        )?;
        out.flush()?;
    }
    Ok(())
}
