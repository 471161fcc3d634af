package driver

import "sync"

// Loss is a one-shot signal that something a backend holds (a publication, a
// lease, a session) is lost, with the reason. Embedded in a publication it
// provides Lost and Err. The zero value is ready to use; it is safe for
// concurrent use.
type Loss struct {
	mu   sync.Mutex
	ch   chan struct{}
	err  error
	lost bool
}

func (l *Loss) chanLocked() chan struct{} {
	if l.ch == nil {
		l.ch = make(chan struct{})
	}
	return l.ch
}

// Lost is closed once Lose has been called.
func (l *Loss) Lost() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.chanLocked()
}

// Lose records err as the reason and closes Lost. Only the first call
// counts; it reports whether this call was the first.
func (l *Loss) Lose(err error) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.lost {
		return false
	}
	l.lost, l.err = true, err
	close(l.chanLocked())
	return true
}

// Err returns the reason given to Lose, nil before.
func (l *Loss) Err() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.err
}

// IsLost reports whether Lose has been called.
func (l *Loss) IsLost() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lost
}
