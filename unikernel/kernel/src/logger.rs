//! The console logger: `log` records to COM1 with an uptime stamp. The level
//! comes from `memd.log=` (error, warn, info, debug, trace, off).

use core::fmt::Write;

use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;

use crate::arch::{serial, time};

struct Console {
    lock: Mutex<()>,
}

static LOGGER: Console = Console {
    lock: Mutex::new(()),
};

impl Console {
    fn emit(&self, level: &str, args: core::fmt::Arguments) {
        let ns = time::uptime_ns();
        let _guard = self.lock.lock();
        let _ = writeln!(
            serial::Serial,
            "[{:>4}.{:06}] {:<5} {}",
            ns / 1_000_000_000,
            (ns / 1000) % 1_000_000,
            level,
            args
        );
    }
}

/// Logs a line whatever the level: milestones the host waits for
/// (`memd: ready`, the self-test verdict).
pub fn always(args: core::fmt::Arguments) {
    LOGGER.emit("NOTE", args);
}

impl Log for Console {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            self.emit(record.level().as_str(), *record.args());
        }
    }

    fn flush(&self) {}
}

/// Installs the logger at `Info`.
pub fn init() {
    // `set_logger` fails only if a logger is already set: then keep that one.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Info);
}

/// Parses a `memd.log=` value.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Writes directly to the console, bypassing levels (panics, final lines).
pub fn write_raw(args: core::fmt::Arguments) {
    let _ = serial::Serial.write_fmt(args);
}
