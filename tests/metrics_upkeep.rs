//! The Prometheus recorder's histogram samples do not pile up when nobody scrapes.
//!
//! The exporter keeps each histogram sample until its upkeep folds it into the
//! buckets, and pitboss installs it with `install_recorder`, which leaves that upkeep
//! to the caller. Before the upkeep thread, a pitboss that was never scraped kept every
//! call's duration: its RSS grew by about 2 MiB per 80,000 calls, without end.
//!
//! This test binary counts the bytes it has allocated and not freed (its own global
//! allocator), installs pitboss's recorder, records 200,000 durations, and waits for
//! the memory they took to come back without any scrape.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes in use.
struct Counting;

static IN_USE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            IN_USE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn in_use() -> isize {
    IN_USE.load(Ordering::Relaxed)
}

#[test]
fn histogram_samples_are_folded_without_a_scrape() {
    let handle = pitboss::telemetry::prometheus().expect("pitboss's recorder is installed");
    let histogram = metrics::histogram!(
        "pitboss_request_duration_seconds",
        "backend" => "legacy",
        "command" => "echo",
        "outcome" => "ok",
    );
    histogram.record(0.001);
    handle.run_upkeep();
    let before = in_use();

    const SAMPLES: usize = 200_000;
    for i in 0..SAMPLES {
        histogram.record(0.0001 * (i % 100) as f64);
    }
    let held = in_use() - before;
    // Each sample is an f64 in the exporter's bucket until upkeep: the samples are
    // held, and what the test waits for is measurable.
    assert!(
        held >= (SAMPLES * 8) as isize,
        "200,000 samples should hold at least 1.6 MB until upkeep; they hold {held} bytes"
    );

    // No scrape and no explicit upkeep from here: only pitboss's own upkeep can fold
    // them. It runs every UPKEEP_EVERY; allow many times that. Calls keep coming
    // meanwhile (a trickle of 200 per poll), as they would in a server: the exporter
    // frees the folded blocks through crossbeam's epochs, which advance only while
    // something records.
    let bound = pitboss::telemetry::UPKEEP_EVERY * 20 + Duration::from_secs(5);
    let started = Instant::now();
    let mut recorded = SAMPLES + 1;
    let mut left = held;
    while started.elapsed() < bound {
        for _ in 0..200 {
            histogram.record(0.002);
        }
        recorded += 200;
        left = in_use() - before;
        if left < 256 * 1024 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        left < 256 * 1024,
        "{left} of the {held} bytes the samples took are still held after {:?} without a scrape: \
         nothing runs the recorder's upkeep",
        started.elapsed()
    );

    // The samples were folded, not dropped: the scrape counts every one of them.
    handle.run_upkeep();
    let text = handle.render();
    let count = text
        .lines()
        .find(|l| {
            l.starts_with("pitboss_request_duration_seconds_count")
                && l.contains("command=\"echo\"")
        })
        .unwrap_or_else(|| panic!("no duration count in the scrape:\n{text}"));
    let n: u64 = count
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the count in {count:?}"));
    assert_eq!(n, recorded as u64, "{count}");
}
