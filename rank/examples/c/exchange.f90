! Fortran on krun: every rank sends an array to its right neighbour, receives one from its
! left (any source, checking who sent it), keeps a running total in checkpointed memory and
! checkpoints after each of 3 rounds. Rank 0 prints the total over all ranks.
program exchange
  use iso_c_binding
  use krun
  implicit none
  integer(c_int), parameter :: n = 1000
  integer(c_int) :: rc, me, np, right, left, round, src
  integer(c_long) :: got, version
  integer(c_int64_t), target :: mine(n), theirs(n)
  integer(c_int64_t), pointer :: total(:)
  integer(c_int64_t), target :: part
  type(c_ptr) :: mem
  type(krun_status) :: st
  integer :: i

  rc = krun_init()
  if (rc < 0) stop 1
  me = krun_rank()
  np = krun_size()
  right = mod(me + 1, np)
  left = mod(me + np - 1, np)
  mem = krun_alloc(4096_c_size_t)
  call c_f_pointer(mem, total, [2])
  rc = krun_register("exchange" // c_null_char, mem, 4096_c_size_t)
  if (rc < 0) stop 2
  if (rc == 0) total = 0
  do round = int(total(2)) + 1, 3
    do i = 1, n
      mine(i) = int(me, c_int64_t) * 1000 + i + round
    end do
    rc = krun_send(right, 5, c_loc(mine), int(8 * n, c_size_t))
    if (rc < 0) stop 3
    got = krun_recv(KRUN_ANY_SOURCE, 5, c_loc(theirs), int(8 * n, c_size_t), st)
    if (got /= 8 * n .or. st%source /= left) stop 4
    total(1) = total(1) + sum(theirs)
    total(2) = round
    version = krun_checkpoint()
    if (version < 0) stop 5
  end do
  part = total(1)
  if (me /= 0) then
    rc = krun_send(0, 6, c_loc(part), 8_c_size_t)
  else
    do src = 1, np - 1
      got = krun_recv(src, 6, c_loc(theirs), 8_c_size_t, st)
      part = part + theirs(1)
    end do
    print '(a,i0,a,i0,a,i0)', 'exchange: ranks ', np, ' checkpoints ', version, ' total ', part
  end if
  rc = krun_finalize()
end program exchange
