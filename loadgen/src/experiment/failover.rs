//! `experiment failover`: a steady chunk-read load through the thin client while each node
//! in turn is killed (-9) and restarted. Reports errors (the goal is none), origin fetches,
//! the fleet hit rate over time (plotted) and latency per phase.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use slapshot_client::{ChunkSource, FleetClient, config::ReadMode, metrics::get};
use slapshot_core::HumanDuration;

use super::{Common, Stop, open_loop, start_fleet};
use crate::{
    chunks::error_kind,
    plot,
    report::{Recorder, Report, us},
    shards::Rng,
};

#[derive(Debug, Clone, clap::Args)]
pub struct FailoverArgs {
    #[command(flatten)]
    pub common: Common,
    /// Distinct chunks (512 KiB each) to read.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub chunks: usize,
    /// Chunk reads started per second (open loop: the load stays the same while a node is
    /// down).
    #[arg(long, value_name = "R", default_value_t = 1000.0)]
    pub rate: f64,
    /// How long each node stays down, and then up before the next one goes.
    #[arg(long, value_name = "DURATION", default_value = "3s")]
    pub phase: HumanDuration,
    /// What happens to each node in turn: kill (-9, then a restart on the same store) or
    /// stop (SIGSTOP, a black hole whose connections hang, then SIGCONT).
    #[arg(long, value_name = "FAULT", default_value = "kill", value_parser = ["kill", "stop"])]
    pub fault: String,
    /// The client's read mode: all (late binding) or hedged.
    #[arg(long, value_name = "MODE", default_value = "all")]
    pub read_mode: String,
}

/// Chunks drawn for the reads, cycled through.
const PICKS: usize = 1 << 16;

/// Samples of the timeline, every `TICK`.
const TICK: Duration = Duration::from_millis(250);

pub async fn run(args: FailoverArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.common.out)?;
    let work = tempfile::Builder::new()
        .prefix("slapshot-failover-")
        .tempdir()?;
    let mut fleet = start_fleet(work.path(), 5, 4, 5, &args.common).await?;
    let result = experiment(&args, &mut fleet).await;
    fleet.stop().await;
    result
}

async fn experiment(
    args: &FailoverArgs,
    fleet: &mut slapshot_client::cli::fleet::LocalFleet,
) -> anyhow::Result<()> {
    let mut config = fleet.config.clone();
    config.read.mode = match args.read_mode.as_str() {
        "all" => ReadMode::All,
        "hedged" => ReadMode::Hedged,
        other => anyhow::bail!("--read-mode is all or hedged, not {other:?}"),
    };
    crate::pace::check_rate(args.rate, "--rate")?;
    anyhow::ensure!(args.chunks > 0, "--chunks must be at least 1");
    let client = FleetClient::new(config)?;
    eprintln!(
        "writing {} chunks of 512 KiB to the origin and the fleet",
        args.chunks
    );
    let names = Arc::new(
        crate::chunks::write_chunks(&client, args.chunks, 512 << 10, args.common.seed).await?,
    );

    let stop_fault = args.fault == "stop";
    let (down, back) = if stop_fault {
        ("stopped", "continued")
    } else {
        ("down", "back")
    };
    let mut phases: Vec<String> = vec!["baseline".into()];
    for i in 0..fleet.config.nodes.len() {
        phases.push(format!("node-{i} {down}"));
        phases.push(format!("node-{i} {back}"));
    }
    // When each phase began (phase 0 now): a read belongs to the phase it was due in,
    // found by its due time, however late it started or ended (a kill's slow reads are
    // charged to the kill, not to the restart after it).
    let phase_starts = Arc::new(Mutex::new(vec![Instant::now()]));
    let stop = Arc::new(Stop::default());
    let live = Arc::new(crate::report::Live::default());

    // The load: reads started at a fixed rate (open loop), each recorded into the phase
    // it was due in. Per phase: the reads, and how many of them the origin served.
    let recorders: Arc<Vec<Mutex<(Recorder, u64)>>> = Arc::new(
        phases
            .iter()
            .map(|_| Mutex::new((Recorder::default(), 0)))
            .collect(),
    );
    let mut rng = Rng::new(args.common.seed);
    let picks: Arc<Vec<usize>> = Arc::new(
        (0..PICKS)
            .map(|_| rng.below(names.len() as u64) as usize)
            .collect(),
    );
    let load = {
        let (client, names, phase_starts, stop, live, recorders) = (
            client.clone(),
            names.clone(),
            phase_starts.clone(),
            stop.clone(),
            live.clone(),
            recorders.clone(),
        );
        let rate = args.rate;
        tokio::spawn(async move {
            open_loop(None, rate, Some(&stop), |i, due| {
                let (client, names, live, recorders, picks, phase_starts) = (
                    client.clone(),
                    names.clone(),
                    live.clone(),
                    recorders.clone(),
                    picks.clone(),
                    phase_starts.clone(),
                );
                async move {
                    let name = names[picks[i % PICKS]];
                    let result = client.get_chunk_with_source(&name).await;
                    let p = phase_of(&phase_starts, due).min(recorders.len() - 1);
                    let (recorder, from_origin) =
                        &mut *recorders[p].lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok((bytes, source)) => {
                            recorder.success(due.elapsed(), bytes.len() as u64);
                            live.count(true, bytes.len() as u64);
                            if source == ChunkSource::Origin {
                                *from_origin += 1;
                            }
                        }
                        Err(e) => {
                            recorder.error(due.elapsed(), error_kind(&e));
                            live.count(false, 0);
                        }
                    }
                }
            })
            .await
        })
    };

    // The timeline: reads, errors and origin fetches per tick.
    let metrics = client.metrics().clone();
    let (timeline_live, timeline_stop) = (live.clone(), stop.clone());
    let sampler = tokio::spawn(async move {
        let started = Instant::now();
        let mut points: Vec<(f64, u64, u64, u64)> = Vec::new();
        let mut last = (0u64, 0u64, 0u64);
        let mut tick = tokio::time::interval(TICK);
        while !timeline_stop.is_set() {
            tick.tick().await;
            let now = (
                timeline_live.requests.load(Ordering::Relaxed),
                timeline_live.errors.load(Ordering::Relaxed),
                get(&metrics.origin_fetches),
            );
            points.push((
                started.elapsed().as_secs_f64(),
                now.0 - last.0,
                now.1 - last.1,
                now.2 - last.2,
            ));
            last = now;
        }
        points
    });

    let mut marks: Vec<(f64, String)> = Vec::new();
    let started = Instant::now();
    let origin_before = get(&client.metrics().origin_fetches);
    let mut origin_per_phase = vec![0u64; phases.len()];
    let mut last_origin = origin_before;
    let mut current = 0;
    let mut next_phase = |p: usize, marks: &mut Vec<(f64, String)>| {
        let origin = get(&client.metrics().origin_fetches);
        origin_per_phase[current] += origin - last_origin;
        last_origin = origin;
        current = p;
        lock(&phase_starts).push(Instant::now());
        marks.push((started.elapsed().as_secs_f64(), phases[p].clone()));
    };
    let faults = async {
        tokio::time::sleep(args.phase.0).await;
        for i in 0..fleet.config.nodes.len() {
            if stop_fault {
                eprintln!("stopping node-{i} (SIGSTOP)");
                fleet.pause_node(i);
            } else {
                eprintln!("killing node-{i}");
                fleet.kill_node(i).await;
            }
            next_phase(1 + 2 * i, &mut marks);
            tokio::time::sleep(args.phase.0).await;
            if stop_fault {
                eprintln!("continuing node-{i} (SIGCONT)");
                fleet.resume_node(i);
            } else {
                eprintln!("restarting node-{i}");
                fleet.restart_node(i).await?;
            }
            next_phase(2 + 2 * i, &mut marks);
            tokio::time::sleep(args.phase.0).await;
        }
        anyhow::Ok(())
    }
    .await;
    // The load and the timeline end whether or not the faults ran to the end.
    stop.now();
    faults?;
    let paced = load.await?;
    // After the load: reads due before the stop may still have been running.
    origin_per_phase[current] += get(&client.metrics().origin_fetches) - last_origin;
    let late = paced.late;
    let lag_p99 = paced.lag.value_at_quantile(0.99);
    let (per_phase, origin_reads): (Vec<Recorder>, Vec<u64>) = recorders
        .iter()
        .map(|r| std::mem::take(&mut *r.lock().unwrap_or_else(|e| e.into_inner())))
        .unzip();
    let points = sampler.await?;

    // The report.
    use std::fmt::Write;
    let mut table = String::from(
        "| phase | reads | errors | read from the origin | fleet hit rate | origin fetches | p50 | p99 | p99.9 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let mut json_phases = Vec::new();
    let mut total_errors = 0;
    for (i, name) in phases.iter().enumerate() {
        let r = Report::new(&per_phase[i], args.phase.0);
        total_errors += r.errors;
        // The share of the phase's reads the fleet served (by each read's own source).
        let hit_rate = if r.requests == 0 {
            1.0
        } else {
            (r.successes - origin_reads[i]) as f64 / r.requests as f64
        };
        let _ = writeln!(
            table,
            "| {name} | {} | {} | {} | {:.2}% | {} | {} | {} | {} |",
            r.requests,
            r.errors,
            origin_reads[i],
            100.0 * hit_rate,
            origin_per_phase[i],
            us(r.p50_us),
            us(r.p99_us),
            us(r.p999_us)
        );
        json_phases.push(serde_json::json!({
            "phase": name,
            "requests": r.requests,
            "successes": r.successes,
            "errors": r.errors,
            "errors_by_kind": r.errors_by_kind,
            "origin_reads": origin_reads[i],
            "origin_fetches": origin_per_phase[i],
            "hit_rate": hit_rate,
            "p50_us": r.p50_us,
            "p99_us": r.p99_us,
            "p999_us": r.p999_us,
            "max_us": r.max_us,
        }));
    }
    let _ = writeln!(
        table,
        "\n{total_errors} errors in all (goal: none); {} reads a second offered, {late} started over 1 ms late; the generator's own lag (due to start) p99 {}",
        args.rate,
        us(lag_p99)
    );
    crate::print_stdout(&table)?;
    std::fs::write(args.common.out.join("failover.md"), &table)?;
    let hit_rate: Vec<(f64, f64)> = points
        .iter()
        .map(|(t, reads, _, origin)| {
            (
                *t,
                // Origin fetches are counted as they start and reads as they end, so a
                // tick can see more of the first than of the second: held to [0, 1].
                if *reads == 0 {
                    1.0
                } else {
                    (1.0 - *origin as f64 / *reads as f64).clamp(0.0, 1.0)
                },
            )
        })
        .collect();
    let reads_per_second: Vec<(f64, f64)> = points
        .iter()
        .map(|(t, reads, _, _)| (*t, *reads as f64 / TICK.as_secs_f64()))
        .collect();
    for file in plot::timeline(
        &args.common.out.join("failover-hit-rate"),
        "fleet hit rate while each node is killed and restarted",
        "hit rate",
        &[("hit rate".into(), hit_rate.clone())],
    )? {
        eprintln!("wrote {}", file.display());
    }
    for file in plot::timeline(
        &args.common.out.join("failover-reads"),
        "chunk reads per second while each node is killed and restarted",
        "reads per second",
        &[("reads/s".into(), reads_per_second)],
    )? {
        eprintln!("wrote {}", file.display());
    }
    let json = serde_json::json!({
        "phases": json_phases,
                "errors": total_errors,
        "rate": args.rate,
        "late_starts": late,
        "generator_lag_p99_us": lag_p99,
        "marks": marks,
        "timeline": points.iter().map(|(t, reads, errors, origin)| serde_json::json!({
            "seconds": t, "reads": reads, "errors": errors, "origin_fetches": origin
        })).collect::<Vec<_>>(),
    });
    std::fs::write(
        args.common.out.join("failover.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    eprintln!("wrote {}", args.common.out.join("failover.json").display());
    Ok(())
}

/// The phase a read due at `due` belongs to: the last one that began at or before it.
fn phase_of(starts: &Mutex<Vec<Instant>>, due: Instant) -> usize {
    lock(starts)
        .partition_point(|&start| start <= due)
        .saturating_sub(1)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_belongs_to_the_phase_it_was_due_in() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let starts = Mutex::new(vec![at(0), at(100), at(200)]);
        assert_eq!(phase_of(&starts, at(0)), 0);
        assert_eq!(phase_of(&starts, at(99)), 0);
        assert_eq!(phase_of(&starts, at(100)), 1);
        assert_eq!(phase_of(&starts, at(150)), 1);
        assert_eq!(phase_of(&starts, at(5000)), 2);
    }
}
