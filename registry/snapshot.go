package registry

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/rollcall-go/rollcall/registry/driver"
)

// Snapshot configures the on-disk snapshot of watched lists, for clients
// that start while the registry is down (Dubbo's registry cache file, Nacos'
// failover directory). When Dir is set, the Watchers of each service write
// the last complete, fresh list they have seen to a file of its own (atomically: a
// temporary file renamed over it, at most once per second); a Watcher that
// starts and gets no list from the registry within Wait, or whose watch fails
// before its first list, delivers the snapshot instead, marked Stale, with
// Update.Snapshot saying when it was written. Once the registry answers, the
// Watcher delivers the difference to the registry's list, as after any
// outage. A snapshot older than MaxAge, written by another version or for
// another registry or service, or that cannot be read, is ignored with one
// log line. Snapshots hold instances only, never credentials.
type Snapshot struct {
	// Dir holds the snapshot files; empty turns snapshots off. It is made
	// (0700) on the first write.
	Dir string
	// Key tells registries apart in Dir: the file of a service is named by
	// a hash of Key and the service name. Open sets it to the redacted
	// registry URL; registries made with New that share a Dir need keys of
	// their own.
	Key string
	// MaxAge: snapshots written longer ago are not used; 72h when zero.
	MaxAge time.Duration
	// Wait is how long a new Watcher waits for the registry's first list
	// before it delivers the snapshot; 2s when zero.
	Wait time.Duration
}

func (s Snapshot) withDefaults() Snapshot {
	if s.MaxAge <= 0 {
		s.MaxAge = 72 * time.Hour
	}
	if s.Wait <= 0 {
		s.Wait = 2 * time.Second
	}
	return s
}

const (
	snapshotVersion  = 1
	snapshotMaxBytes = 4 << 20 // a larger list is not written
	snapshotEvery    = time.Second
)

// snapshotFile is the content of a snapshot file.
type snapshotFile struct {
	Version   int            `json:"version"`
	Registry  string         `json:"registry"`
	Service   string         `json:"service"`
	Written   time.Time      `json:"written"`
	Instances []snapInstance `json:"instances"`
}

type snapInstance struct {
	ID       string            `json:"id"`
	Addr     string            `json:"addr"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// snapshotPath is the file of service's snapshot.
func (s Snapshot) path(service string) string {
	h := sha256.Sum256([]byte(s.Key + "\x00" + service))
	return filepath.Join(s.Dir, "rollcall-"+hex.EncodeToString(h[:16])+".json")
}

// loadSnapshot reads service's snapshot: its instances (each validated as a
// registry list is) and when it was written; ok is false when there is none
// to use, with a log line if a file was there but could not be used.
func (r *registry) loadSnapshot(service string) (list []Instance, written time.Time, ok bool) {
	s := r.opts.Snapshot
	path := s.path(service)
	ignore := func(why string, args ...any) ([]Instance, time.Time, bool) {
		r.log.Warn("registry: ignoring the snapshot: "+fmt.Sprintf(why, args...), "service", service, "file", path)
		return nil, time.Time{}, false
	}
	data, err := readLimited(path, snapshotMaxBytes)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, time.Time{}, false
	case err != nil:
		return ignore("%v", err)
	}
	var f snapshotFile
	if err := json.Unmarshal(data, &f); err != nil {
		return ignore("not a snapshot: %v", err)
	}
	switch age := time.Since(f.Written); {
	case f.Version != snapshotVersion:
		return ignore("version %d, want %d", f.Version, snapshotVersion)
	case f.Registry != s.Key || f.Service != service:
		return ignore("written for service %q of %q", f.Service, f.Registry)
	case f.Written.IsZero() || age > s.MaxAge:
		return ignore("written %v ago, more than %v", age.Round(time.Second), s.MaxAge)
	}
	for _, si := range f.Instances {
		if in, ok := r.accept(service, driver.Instance{Service: service, ID: si.ID, Addr: si.Addr, Metadata: si.Metadata}); ok {
			list = append(list, in)
		}
	}
	return list, f.Written, true
}

func readLimited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > limit {
		return nil, fmt.Errorf("%d bytes, more than %d", st.Size(), limit)
	}
	data := make([]byte, st.Size())
	_, err = f.ReadAt(data, 0)
	if st.Size() == 0 {
		err = nil
	}
	return data, err
}

// writeSnapshot writes list as service's snapshot: a temporary file in Dir,
// synced, then renamed over the old one, so that a reader sees the old file
// or the new one, never a part.
func (r *registry) writeSnapshot(service string, list []Instance) error {
	s := r.opts.Snapshot
	f := snapshotFile{Version: snapshotVersion, Registry: s.Key, Service: service, Written: time.Now().UTC(), Instances: make([]snapInstance, len(list))}
	for i, in := range list {
		f.Instances[i] = snapInstance{ID: in.ID, Addr: in.Addr, Metadata: in.Metadata}
	}
	data, err := json.Marshal(f)
	if err != nil {
		return err
	}
	if len(data) > snapshotMaxBytes {
		return fmt.Errorf("the list of %d instances takes %d bytes, more than %d", len(list), len(data), snapshotMaxBytes)
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(s.Dir, ".rollcall-snapshot-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name()) // after a successful rename there is nothing to remove
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), s.path(service))
}

// wakeSnapshots tells the snapshot loop to look; it never blocks.
func (f *feed) wakeSnapshots() {
	if f.snapWake == nil {
		return
	}
	select {
	case f.snapWake <- struct{}{}:
	default:
	}
}

// snapshots is a Watcher's snapshot loop, run beside run when
// Options.Snapshot.Dir is set: it serves the snapshot if the registry gives
// no list in time, then writes the fresh lists, at most once per
// snapshotEvery, the last one at Close.
func (f *feed) snapshots(done chan<- struct{}) {
	defer close(done)
	f.mu.Lock()
	held := f.snap != nil
	f.mu.Unlock()
	if held {
		t := time.NewTimer(f.r.opts.Snapshot.Wait)
		select {
		case <-f.ctx.Done():
			t.Stop()
			return
		case <-t.C:
			f.serveSnapshot()
		}
	}
	var (
		saved   []Instance // the list last written
		last    time.Time  // when
		pending bool
		timer   *time.Timer
		tick    <-chan time.Time
		warned  bool
	)
	save := func() {
		list, ok := f.freshList()
		if !ok || last.After(time.Time{}) && slices.EqualFunc(list, saved, Instance.Equal) {
			return
		}
		if err := f.r.writeSnapshot(f.service, list); err != nil {
			if !warned {
				warned = true
				f.r.log.Warn("registry: cannot write the snapshot", "service", f.service, "err", err)
			}
			return
		}
		saved, last = list, time.Now()
	}
	for {
		select {
		case <-f.ctx.Done():
			if timer != nil {
				timer.Stop()
			}
			select {
			case <-f.snapWake:
				pending = true
			default:
			}
			if pending {
				save()
			}
			return
		case <-f.snapWake:
			pending = true
		case <-tick:
			tick = nil
		}
		if !pending || tick != nil {
			continue
		}
		if d := snapshotEvery - time.Since(last); d > 0 {
			timer = time.NewTimer(d)
			tick = timer.C
			continue
		}
		pending = false
		save()
	}
}

// freshList returns the list to snapshot: the registry's complete list,
// while the Watcher is fresh.
func (f *feed) freshList() ([]Instance, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.synced || f.stale || !f.snapAt.IsZero() {
		return nil, false
	}
	return sortedValues(f.known), true
}

// heldSnapshot is a snapshot read by a new Watcher.
type heldSnapshot struct {
	list    []Instance
	written time.Time
}

func (f *feed) serveSnapshot() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.serveSnapshotLocked()
}

// serveSnapshotLocked makes the snapshot held the Watcher's list, stale,
// unless the registry gave one already. Called under mu.
func (f *feed) serveSnapshotLocked() {
	sn := f.snap
	if sn == nil || f.synced || f.ctx.Err() != nil {
		return
	}
	f.snap = nil
	for _, in := range sn.list {
		f.known[in.ID] = in
		f.markLocked(in.ID)
	}
	age := time.Since(sn.written).Round(time.Second)
	why := "no answer yet"
	if f.err != nil {
		why = f.err.Error()
	}
	f.synced, f.stale, f.snapAt = true, true, sn.written
	f.announceLocked()
	f.err = fmt.Errorf("%w: serving the snapshot written %v ago (%s): the registry gave no list: %s", ErrUnavailable, age, sn.written.Format(time.RFC3339), why)
	f.r.log.Warn("registry: the registry gave no list; serving the snapshot", "service", f.service, "instances", len(sn.list), "age", age)
	f.wakeLocked()
}
